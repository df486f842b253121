"""LLMEngine: add_request / step / abort. The one place the model, cache, scheduler and runner meet."""

from __future__ import annotations

import dataclasses
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.draft_proposer import DraftModelProposer
from tokenmill.engine.eagle_proposer import EagleProposer
from tokenmill.engine.runner import ModelRunner, kv_bytes_per_block
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.speculative import NgramProposer, Proposer, SpeculativeConfig
from tokenmill.engine.stop_checker import append_text_and_check_stop
from tokenmill.errors import InvalidParameterError, PromptTooLongError, RequestTooLargeError
from tokenmill.kernels import kernels_available
from tokenmill.layers.sampler import SamplingRow
from tokenmill.models.draft import load_draft
from tokenmill.models.eagle import EagleDraft
from tokenmill.models.loader import LoadedModel, load_model
from tokenmill.models.registry import model_class
from tokenmill.models.tokenizer import IncrementalDetokenizer
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.sampling import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KV_DTYPES = _DTYPES | {"int8": torch.int8}  # int8: per (token, head) row, one scale (layers/attention.py)
BRANCH_BLOCKS = 8


@dataclass
class EngineStats:
    """Counters since start, read by the CLI, benchmarks and (later) the metrics endpoint."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    scheduled_tokens: int = 0
    last_batch_size: int = 0
    last_batch_tokens: int = 0
    spec_verifications: int = 0  # sequence-steps that verified drafts
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_branch_tokens: int = 0  # accepted first tokens that were the draft's second choice
    # Wall seconds per step phase: schedule, prepare, model, sample, postprocess (and propose when
    # speculating). Everything but "model" is host overhead.
    phase_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens gained per verifying sequence-step (accepted drafts + the target's own token)."""
        if not self.spec_verifications:
            return 0.0
        return (self.spec_accepted_tokens + self.spec_verifications) / self.spec_verifications


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence]
    detokenizers: dict[int, IncrementalDetokenizer]
    forked: bool = False

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        torch.set_num_threads(config.resolved_threads())
        self.config = config
        dtype = _DTYPES[config.dtype]
        self.loaded = loaded or load_model(config.model, dtype)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        model_max = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_max, model_max)
        self.model = model_class(self.model_config)(
            self.model_config,
            self.loaded.weights,
            self.max_model_len,
            config.quantization,
            config.quantization_group_size,
        )
        kv_dtype = _KV_DTYPES[config.resolved_kv_cache_dtype()]
        per_block = kv_bytes_per_block(self.model_config, config.block_size, kv_dtype)
        num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_gib * 2**30 // per_block))
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        # Scratch blocks for the branch candidates of speculative verification (speculation only runs
        # at small batches; more branches than this in one step go unverified).
        branch_blocks = BRANCH_BLOCKS if config.speculative else 0
        self.runner = ModelRunner(self.model, config, num_blocks, kv_dtype, branch_blocks)
        self.eos_token_ids = tuple(
            sorted(set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        )
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self.runner.phase_seconds = self.stats.phase_seconds
        self._seed_source = random.Random(config.seed)
        self.speculative = SpeculativeConfig.parse(config.speculative) if config.speculative else None
        self.proposer = self._make_proposer(num_blocks, dtype) if self.speculative else None
        self.lookup = NgramProposer(self.speculative) if self.speculative and self.speculative.ngram else None

    def _make_proposer(self, num_blocks: int, dtype: torch.dtype) -> Proposer:
        spec = self.speculative
        if spec.method == "draft":
            # A draft's precision only moves acceptance, never the output: an EAGLE draft runs int8 even
            # beside an fp32 target (0.97 -> 0.60 ms per guess on SmolLM2's draft).
            quantization = self.config.quantization or ("int8" if kernels_available() else None)
            draft = load_draft(spec.draft_path, self.loaded, self.max_model_len, dtype, quantization)
            if isinstance(draft, EagleDraft):
                return EagleProposer(draft, self.model_config.vocab_size, branch=bool(spec.branch))
            # As many blocks as the target: the draft can hold every running sequence, at a fraction
            # of the memory (its KV per token is small).
            return DraftModelProposer(draft, self.config, num_blocks, self.model_config.vocab_size)
        return NgramProposer(spec)

    # ---- requests in -------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameterError("prompt must not be empty", "prompt")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, list | tuple) or not prompt:
            raise InvalidParameterError("prompt must be a non-empty string or list of token ids", "prompt")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise InvalidParameterError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        return None, list(prompt)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Validate and queue a request; raises a typed error and changes nothing when input is bad."""
        if request_id in self.requests:
            raise InvalidParameterError(f"request id {request_id!r} is already in use", "request_id")
        params = dataclasses.replace(params) if params else SamplingParams()
        text, token_ids = self.tokenize_prompt(prompt)
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidParameterError(
                f"stop_token_ids must be below the vocabulary size {vocab}", "stop_token_ids"
            )
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(token_ids)} tokens; this model's context is {self.max_model_len} tokens "
                "and at least one must be left to generate",
                "prompt",
            )
        room = self.max_model_len - len(token_ids)
        if params.max_tokens is None or params.max_tokens > room:
            params.max_tokens = room
            params.min_tokens = min(params.min_tokens, room)
        blocks = self.block_manager.blocks_needed(len(token_ids) + params.max_tokens)
        if blocks > self.block_manager.num_blocks:
            raise RequestTooLargeError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) needs {blocks} "
                f"KV blocks but the cache has only {self.block_manager.num_blocks}; "
                "lower max_tokens or raise the KV budget",
                "max_tokens",
            )
        now = arrival_time if arrival_time is not None else time.monotonic()
        request = _Request(request_id, text, token_ids, params, now, [], {})
        self.requests[request_id] = request
        parent = self._new_sequence(request, 0)
        self.scheduler.add(parent)
        self.stats.prompt_tokens += len(token_ids)

    def _new_sequence(self, request: _Request, index: int) -> Sequence:
        seed = request.params.seed
        seed = (seed + index) % 2**63 if seed is not None else self._seed_source.getrandbits(63)
        generator = None if request.params.greedy else torch.Generator().manual_seed(seed)
        seq = Sequence(
            request.request_id,
            index,
            request.prompt_token_ids,
            request.params,
            generator,
            request.arrival_time,
        )
        request.seqs.append(seq)
        request.detokenizers[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, request.params.skip_special_tokens
        )
        return seq

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                self._release_draft(seq)
                seq.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one iteration -----------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that moved (finished_only: only
        those that finished, for callers that do not stream: building the others' outputs, their text
        included, was ~1.5% of a 64-request batch)."""
        phases = self.stats.phase_seconds
        started = time.perf_counter()
        if self.proposer is not None:
            self._propose_drafts()
            phases["propose"] += time.perf_counter() - started
        scheduling = time.perf_counter()
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            self._release_draft(seq)
        if not batch.entries:
            return []
        rows = {e.seq.seq_id: self._sampling_row(e.seq) for e in batch.entries if e.completes_known_tokens}
        phases["schedule"] += time.perf_counter() - scheduling
        observing = self.proposer is not None and self.proposer.wants_hidden_states
        results = self.runner.execute(batch, rows, keep_hidden=observing)
        postprocessing = time.perf_counter()
        self.stats.steps += 1
        self.stats.scheduled_tokens += batch.num_tokens
        self.stats.last_batch_size = len(batch)
        self.stats.last_batch_tokens = batch.num_tokens
        now = time.monotonic()
        touched: dict[str, list[int]] = {}
        for index, entry in enumerate(batch.entries):
            seq = entry.seq
            drafts = len(seq.draft_token_ids)
            # KV is valid for the known tokens and the accepted drafts; rejected slots are given back.
            verified = entry.num_new_tokens
            if seq.seq_id in results:
                verified += len(results[seq.seq_id]) - 1 - drafts
            if observing:
                first = self.runner.last_ranges[index][0]
                hidden = self.runner.last_hidden[first : first + verified]
                if seq.seq_id in self.runner.branch_taken:  # the last known token's row, then the branch's
                    branch_row = self.runner.branch_taken[seq.seq_id]
                    hidden = torch.cat([hidden[:1], self.runner.last_hidden[branch_row : branch_row + 1]])
                self.proposer.observe(seq, seq.num_computed_tokens, hidden)
            if seq.seq_id not in results:
                seq.num_computed_tokens += verified
                self.block_manager.cache_full_blocks(seq)
                continue
            request = self.requests[seq.request_id]
            tokens = results[seq.seq_id]
            seq.num_computed_tokens += verified
            seq.draft_token_ids = []
            seq.draft_probs = None
            seq.draft_branch = None
            if request.params.n > 1 and not request.forked:
                self._fork(request, seq)
            if drafts:
                self.block_manager.trim(seq)
                seq.num_draft_tokens += drafts
                seq.num_accepted_tokens += len(tokens) - 1
                self.stats.spec_verifications += 1
                self.stats.spec_draft_tokens += drafts
                self.stats.spec_accepted_tokens += len(tokens) - 1
                self.stats.spec_branch_tokens += seq.seq_id in self.runner.branch_taken
            for token, logprob in tokens:
                self._append_token(request, seq, token, logprob, now)
                if seq.is_finished:
                    break
            if not seq.is_finished:
                self.block_manager.cache_full_blocks(seq)
            touched.setdefault(seq.request_id, []).append(seq.index)
        outputs = [
            self._output(self.requests[rid], counts)
            for rid, counts in touched.items()
            if not finished_only or self.requests[rid].finished
        ]
        phases["postprocess"] += time.perf_counter() - postprocessing
        return outputs

    def _propose_drafts(self) -> None:
        """Give decoding sequences draft tokens, while the batch is small enough to be memory-bound."""
        running = self.scheduler.running
        for seq in running:
            seq.draft_token_ids = []
            seq.draft_probs = None
            seq.draft_branch = None
        if len(running) > self.speculative.max_batch:
            return
        seqs, counts = [], []
        for seq in running:
            params = seq.params
            if (
                seq.num_computed_tokens != seq.num_tokens - 1
                or params.uses_penalties
                or params.logprobs is not None
                or seq.num_output_tokens < params.min_tokens
            ):
                continue
            room = min(params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
            k = min(self.speculative.k, room)
            if k > 0:
                seqs.append(seq)
                counts.append(k)
        if self.lookup is not None:  # prompt lookup first; the draft model guesses for the rest
            found = [self.lookup.lookup(seq.token_ids, k) for seq, k in zip(seqs, counts, strict=True)]
            for seq, tokens in zip(seqs, found, strict=True):
                seq.draft_token_ids = tokens
            counts = [k for k, tokens in zip(counts, found, strict=True) if not tokens]
            seqs = [seq for seq, tokens in zip(seqs, found, strict=True) if not tokens]
        if not seqs:
            return
        for seq, proposal in zip(seqs, self.proposer.propose(seqs, counts), strict=True):
            seq.draft_token_ids = proposal.token_ids
            seq.draft_probs = proposal.probs
            seq.draft_branch = proposal.branch if proposal.token_ids else None

    def _release_draft(self, seq: Sequence) -> None:
        if self.proposer is not None:
            self.proposer.release(seq)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < params.min_tokens:
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(self.eos_token_ids))
        return SamplingRow(params, seq.generator, seq.prompt_token_ids, seq.output_token_ids, banned)

    def _fork(self, request: _Request, parent: Sequence) -> None:
        """n > 1: children share the parent's prompt blocks; each recomputes only the last prompt token
        (copy-on-write gives it a private last block) and samples its own first token."""
        request.forked = True
        for index in range(request.params.n - 1, 0, -1):
            child = self._new_sequence(request, index)
            self.block_manager.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens - 1
            self.scheduler.add(child, front=True)
        request.seqs.sort(key=lambda s: s.index)

    def _append_token(self, request: _Request, seq: Sequence, token: int, logprob, now: float) -> None:
        seq.token_ids.append(token)
        self.stats.generation_tokens += 1
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = now
        # Text per token only where stop strings need it; otherwise when an output is built (_output).
        new_text = request.detokenizers[seq.seq_id].step(seq.output_token_ids) if seq.params.stop else ""
        append_text_and_check_stop(seq, new_text, self.eos_token_ids, self.max_model_len)
        if seq.finish_reason is not None:
            seq.finished_time = now
            self.scheduler.finish(seq)
            self._release_draft(seq)

    def _output(self, request: _Request, moved: list[int]) -> RequestOutput:
        finished = request.finished
        if finished:
            del self.requests[request.request_id]
        by_index = {s.index: s for s in request.seqs}
        outputs = []
        counts = []
        for index in range(request.params.n):
            seq = by_index.get(index)
            if seq is None:
                outputs.append(CompletionOutput(index, "", []))
                counts.append(0)
                continue
            if not seq.params.stop:  # the text of the tokens since the last output
                seq.output_text += request.detokenizers[seq.seq_id].step(seq.output_token_ids)
            logprobs = seq.logprobs if request.params.logprobs is not None else None
            outputs.append(
                CompletionOutput(index, seq.output_text, seq.output_token_ids, seq.finish_reason, logprobs)
            )
            counts.append(moved.count(index))
        first = request.seqs[0]
        metrics = RequestMetrics(
            arrival_time=request.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=min(
                (s.first_token_time for s in request.seqs if s.first_token_time), default=None
            ),
            finished_time=max((s.finished_time or 0 for s in request.seqs), default=None)
            if finished
            else None,
            num_cached_tokens=first.num_cached_tokens,
            num_preemptions=sum(s.num_preemptions for s in request.seqs),
            spec_draft_tokens=sum(s.num_draft_tokens for s in request.seqs),
            spec_accepted_tokens=sum(s.num_accepted_tokens for s in request.seqs),
        )
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, outputs, finished, metrics, counts
        )
