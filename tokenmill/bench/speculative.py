"""Speculative decoding benchmark: plain vs one or more proposers, single-stream decode, same engine and
the same run (each prompt runs plain, then with every proposer, back to back, so drift on a shared
machine hits all of them alike)."""

from __future__ import annotations

from tokenmill.bench.offline import single_stream_decode
from tokenmill.bench.workloads import chat_messages, grounded_messages
from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams

TASKS = ("input-grounded", "chat")


def _decode_rate(engine: LLMEngine, prompt: str, max_tokens: int) -> tuple[float, list[int]]:
    """Greedy single-stream tokens/s after the first token, and the output ids."""
    tokens, seconds, output = single_stream_decode(
        engine, prompt, SamplingParams(temperature=0, max_tokens=max_tokens)
    )
    return tokens / seconds if seconds > 0 else 0.0, output.outputs[0].token_ids


def run_speculative_bench(
    model: str | None,
    speculative: str | list[str],
    max_tokens: int = 128,
    threads: int | None = None,
    tasks: tuple[str, ...] = TASKS,
) -> dict:
    specs = [speculative] if isinstance(speculative, str) else list(speculative)
    loaded = load_model(model)
    plain = LLMEngine(EngineConfig(model=model, num_threads=threads), loaded)
    engines = {
        s: LLMEngine(EngineConfig(model=model, num_threads=threads, speculative=s), loaded) for s in specs
    }
    workloads = {"input-grounded": grounded_messages, "chat": chat_messages}
    rows = []
    for task in tasks:
        for messages in workloads[task]():
            prompt = plain.tokenizer.apply_chat_template(messages)
            plain_rate, plain_ids = _decode_rate(plain, prompt, max_tokens)
            for spec, fast in engines.items():
                stats = fast.stats
                before = (stats.spec_verifications, stats.spec_accepted_tokens, stats.spec_draft_tokens)
                fast_rate, fast_ids = _decode_rate(fast, prompt, max_tokens)
                verifications = stats.spec_verifications - before[0]
                accepted = stats.spec_accepted_tokens - before[1]
                drafts = stats.spec_draft_tokens - before[2]
                rows.append(
                    {
                        "task": task,
                        "speculative": spec,
                        "prompt": messages[0]["content"][:60],
                        "plain_tok_s": plain_rate,
                        "speculative_tok_s": fast_rate,
                        "speedup": fast_rate / plain_rate if plain_rate else 0.0,
                        "mean_accepted_length": (accepted + verifications) / verifications
                        if verifications
                        else 1.0,
                        "acceptance_rate": accepted / drafts if drafts else 0.0,
                        "identical_output": plain_ids == fast_ids,
                    }
                )
    summary = {}
    for task in tasks:
        for spec in specs:
            picked = [r for r in rows if r["task"] == task and r["speculative"] == spec]
            plain_mean = sum(r["plain_tok_s"] for r in picked) / len(picked)
            fast_mean = sum(r["speculative_tok_s"] for r in picked) / len(picked)
            summary[f"{task} | {spec}"] = {
                "task": task,
                "speculative": spec,
                "plain_tok_s": plain_mean,
                "speculative_tok_s": fast_mean,
                "speedup": fast_mean / plain_mean,
                "mean_accepted_length": sum(r["mean_accepted_length"] for r in picked) / len(picked),
            }
    return {"speculative": specs, "max_tokens": max_tokens, "rows": rows, "summary": summary}


def markdown_report(result: dict) -> str:
    lines = [
        f"Speculative: {', '.join(f'`{s}`' for s in result['speculative'])}; greedy, "
        f"{result['max_tokens']} new tokens, single stream; plain and speculative back to back per prompt.",
        "",
        "| task | speculative | prompt | plain tok/s | speculative tok/s | speedup | mean accepted length "
        "| acceptance | same output |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['task']} | `{r['speculative']}` | {r['prompt']}… | {r['plain_tok_s']:.1f} | "
            f"{r['speculative_tok_s']:.1f} | {r['speedup']:.2f}x | {r['mean_accepted_length']:.2f} | "
            f"{r['acceptance_rate']:.0%} | {'yes' if r['identical_output'] else 'NO'} |"
        )
    lines.append("")
    for s in result["summary"].values():
        lines.append(
            f"- {s['task']}, `{s['speculative']}`: {s['plain_tok_s']:.1f} -> {s['speculative_tok_s']:.1f} "
            f"tok/s ({s['speedup']:.2f}x), mean accepted length {s['mean_accepted_length']:.2f}"
        )
    return "\n".join(lines) + "\n"
