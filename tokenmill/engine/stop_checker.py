"""Decides whether a sequence is done after a new token: EOS, stop ids, stop strings, length."""

from __future__ import annotations

from tokenmill.engine.sequence import Sequence


def append_text_and_check_stop(
    seq: Sequence, new_text: str, eos_token_ids: tuple[int, ...], max_model_len: int
) -> None:
    """Adds new_text to seq.output_text (cut at a stop string) and sets seq.finish_reason when done."""
    params = seq.params
    token = seq.token_ids[-1]
    produced = seq.num_output_tokens
    if produced >= params.min_tokens:
        if (not params.ignore_eos and token in eos_token_ids) or token in params.stop_token_ids:
            seq.finish_reason = "stop"
            return
        if params.stop and new_text:
            old_len = len(seq.output_text)
            seq.output_text += new_text
            window_start = max(0, old_len - max(len(s) for s in params.stop) + 1)
            hits = [(seq.output_text.find(s, window_start), s) for s in params.stop]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                at, stop = min(hits)
                end = at + len(stop) if params.include_stop_str_in_output else at
                seq.output_text = seq.output_text[:end]
                seq.finish_reason = "stop"
                return
            new_text = ""
    seq.output_text += new_text
    if params.max_tokens is not None and produced >= params.max_tokens:
        seq.finish_reason = "length"
    elif seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"
