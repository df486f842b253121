"""Speculative decoding benchmark: plain vs speculative single-stream decode, same engine, same run."""

from __future__ import annotations

from tokenmill.bench.offline import single_stream_decode
from tokenmill.bench.workloads import chat_messages, grounded_messages
from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.models.loader import load_model
from tokenmill.sampling import SamplingParams


def _decode_rate(engine: LLMEngine, prompt: str, max_tokens: int) -> tuple[float, list[int]]:
    """Greedy single-stream tokens/s after the first token, and the output ids."""
    tokens, seconds, output = single_stream_decode(
        engine, prompt, SamplingParams(temperature=0, max_tokens=max_tokens)
    )
    return tokens / seconds if seconds > 0 else 0.0, output.outputs[0].token_ids


def run_speculative_bench(
    model: str | None, speculative: str, max_tokens: int = 128, threads: int | None = None
) -> dict:
    loaded = load_model(model)
    plain = LLMEngine(EngineConfig(model=model, num_threads=threads), loaded)
    fast = LLMEngine(EngineConfig(model=model, num_threads=threads, speculative=speculative), loaded)
    rows = []
    for task, conversations in (("input-grounded", grounded_messages()), ("chat", chat_messages())):
        for messages in conversations:
            prompt = plain.tokenizer.apply_chat_template(messages)
            before = (
                fast.stats.spec_verifications,
                fast.stats.spec_accepted_tokens,
                fast.stats.spec_draft_tokens,
            )
            plain_rate, plain_ids = _decode_rate(plain, prompt, max_tokens)
            fast_rate, fast_ids = _decode_rate(fast, prompt, max_tokens)
            verifications = fast.stats.spec_verifications - before[0]
            accepted = fast.stats.spec_accepted_tokens - before[1]
            drafts = fast.stats.spec_draft_tokens - before[2]
            rows.append(
                {
                    "task": task,
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
    for task in ("input-grounded", "chat"):
        picked = [r for r in rows if r["task"] == task]
        plain_total = sum(r["plain_tok_s"] for r in picked) / len(picked)
        fast_total = sum(r["speculative_tok_s"] for r in picked) / len(picked)
        summary[task] = {
            "plain_tok_s": plain_total,
            "speculative_tok_s": fast_total,
            "speedup": fast_total / plain_total,
        }
    return {"speculative": speculative, "max_tokens": max_tokens, "rows": rows, "summary": summary}


def markdown_report(result: dict) -> str:
    lines = [
        f"Speculative: `{result['speculative']}`, greedy, {result['max_tokens']} new tokens, single stream.",
        "",
        "| task | prompt | plain tok/s | speculative tok/s | speedup | mean accepted length | acceptance "
        "| same output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['task']} | {r['prompt']}… | {r['plain_tok_s']:.1f} | {r['speculative_tok_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['mean_accepted_length']:.2f} | {r['acceptance_rate']:.0%} | "
            f"{'yes' if r['identical_output'] else 'NO'} |"
        )
    lines.append("")
    for task, s in result["summary"].items():
        lines.append(
            f"- {task}: {s['plain_tok_s']:.1f} -> {s['speculative_tok_s']:.1f} tok/s ({s['speedup']:.2f}x)"
        )
    return "\n".join(lines) + "\n"
