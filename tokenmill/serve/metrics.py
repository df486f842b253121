"""Prometheus metrics for /metrics, named like vLLM's (prefix tokenmill:) so dashboards carry over."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tokenmill.engine.engine import LLMEngine
from tokenmill.outputs import RequestMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tokenmill:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tokenmill:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"tokenmill:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_blocks_used = gauge("kv_cache_blocks_used", "KV blocks held by live sequences.")
        self.kv_blocks_total = gauge("kv_cache_blocks_total", "KV blocks in the pool.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Prefix-cache block hits / block queries.")
        self.preemptions = gauge("num_preemptions", "Sequences preempted since start.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens accepted.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.finished = Counter(
            "tokenmill:request_success", "Finished requests.", ["model_name", "finished_reason"], registry=r
        )
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Gap between streamed tokens.", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative tokens proposed.")
        self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Speculative tokens accepted.")
        self.spec_mean_length = gauge(
            "spec_decode_mean_accepted_length", "Tokens per verifying sequence-step (accepted + 1)."
        )
        self.batch_size = histogram("step_batch_size", "Sequences per engine step.", _BATCH_BUCKETS)
        self.step_tokens = histogram("step_num_tokens", "Tokens computed per engine step.", _BATCH_BUCKETS)
        self.model_name = model_name
        self._seen_prompt = 0
        self._seen_generated = 0
        self._seen_drafts = 0
        self._seen_accepted = 0

    def on_step(self, engine: LLMEngine) -> None:
        """Called by the engine thread after every step."""
        stats = engine.stats
        self.batch_size.observe(stats.last_batch_size)
        self.step_tokens.observe(stats.last_batch_tokens)
        self.prompt_tokens.inc(stats.prompt_tokens - self._seen_prompt)
        self.generation_tokens.inc(stats.generation_tokens - self._seen_generated)
        self._seen_prompt, self._seen_generated = stats.prompt_tokens, stats.generation_tokens
        self.spec_draft_tokens.inc(stats.spec_draft_tokens - self._seen_drafts)
        self.spec_accepted_tokens.inc(stats.spec_accepted_tokens - self._seen_accepted)
        self._seen_drafts, self._seen_accepted = stats.spec_draft_tokens, stats.spec_accepted_tokens
        self.spec_mean_length.set(stats.spec_mean_accepted_length)

    def refresh_gauges(self, engine: LLMEngine) -> None:
        """Read the engine's current state (plain integer reads, safe from another thread)."""
        manager = engine.block_manager
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        used = manager.num_blocks - manager.num_free_blocks
        self.kv_blocks_used.set(used)
        self.kv_blocks_total.set(manager.num_blocks)
        self.kv_usage.set(used / manager.num_blocks)
        self.prefix_hit_rate.set(manager.prefix_hit_rate)
        self.preemptions.set(engine.scheduler.num_preemptions)

    def on_finish(self, metrics: RequestMetrics, reasons: list[str | None]) -> None:
        if metrics.ttft is not None:
            self.ttft.observe(metrics.ttft)
        if metrics.e2e_latency is not None:
            self.e2e.observe(metrics.e2e_latency)
        for reason in reasons:
            self.finished.labels(self.model_name, reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
