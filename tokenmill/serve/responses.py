"""Per-choice bookkeeping for responses: text deltas safe to send, and OpenAI's logprob shapes."""

from __future__ import annotations

from tokenmill.models.tokenizer import Tokenizer
from tokenmill.outputs import CompletionOutput
from tokenmill.sampling import SamplingParams, TokenLogprob


class ChoiceStream:
    """Tracks what of one choice has been sent. Text that could still turn out to be the start of a stop
    string is held back until the choice finishes, so a streamed stop string is never half-sent."""

    def __init__(self, index: int, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.index = index
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.text = ""
        self.sent_chars = 0
        self.num_tokens = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.finished = False

    def update(self, out: CompletionOutput, request_finished: bool) -> tuple[str, list[TokenLogprob], bool]:
        """Take the latest state of this choice; return (text to send now, new logprobs, just finished)."""
        if self.finished:
            return "", [], False
        self.text = out.text
        new_logprobs = (out.logprobs or [])[len(self.logprobs) :]
        self.logprobs.extend(new_logprobs)
        self.num_tokens = len(out.token_ids)
        done = out.finish_reason is not None
        safe = len(self.text) if done else max(self.sent_chars, len(self.text) - self.holdback)
        delta = self.text[self.sent_chars : safe]
        self.sent_chars = max(self.sent_chars, safe)
        if done:
            self.finished = True
            self.finish_reason = out.finish_reason
        return delta, new_logprobs, done


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    position = offset
    for entry in entries:
        text = _token_text(tokenizer, entry.token_id)
        tokens.append(text)
        values.append(entry.logprob)
        tops.append({_token_text(tokenizer, t): lp for t, lp in entry.top} if entry.top else None)
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict:
    content = []
    for entry in entries:
        text = _token_text(tokenizer, entry.token_id)
        top = [
            {"token": (t_text := _token_text(tokenizer, t)), "logprob": lp, "bytes": list(t_text.encode())}
            for t, lp in entry.top
        ]
        content.append(
            {"token": text, "logprob": entry.logprob, "bytes": list(text.encode()), "top_logprobs": top}
        )
    return {"content": content}
