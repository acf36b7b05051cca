"""The generation engine: continuous batching over a loaded model, one background thread.

Every consumer (the HTTP server, eval/, the Python API) submits requests here and receives
`TokenEvent`s. The loop, in one thread that owns the model:
1. admits waiting requests, up to `max_batch_size` sequences in flight and `max_prefill_tokens`
   (padded) prompt tokens still to compute, as one prefill group (prefill.py): left-padded, one
   pass over the weights for all of them (an INT4 layer dequantizes once, not once per request),
   starting after the prompt prefix whose keys and values the prefix cache holds
   (prefix_cache.py);
2. computes at most `max_prefill_tokens` padded prompt tokens of the groups in progress, the
   shortest first: a prompt longer than that is prefilled in chunks over several steps, so
   neither the running streams nor a short prompt that arrives later wait for all of it; a
   group whose prompts are done emits its first tokens at once and joins the running batch;
3. runs one decode step for every running sequence together: the quantized layers see M = batch
   rows, which is where INT4/INT8 kernels pay off;
4. drops finished and cancelled sequences from the batch and the KV cache before the next step.
A request that arrives while others decode joins at the next step.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from llmquant.serve import kv_cache
from llmquant.serve.detokenizer import IncrementalDetokenizer
from llmquant.serve.forward.probe import probe_ids
from llmquant.serve.limits import (DEFAULT_MAX_BATCH, DEFAULT_MAX_WAITING, DEFAULT_PREFIX_CACHE_TOKENS,
                                   default_max_prefill_tokens)
from llmquant.serve.prefill import PrefillJob, plan
from llmquant.serve.prefix_cache import PrefixCache
from llmquant.serve.forward.select import select_forward
from llmquant.memory import release_freed_memory
from llmquant.serve.events import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    ContextLengthError,
    EngineBusyError,
    EngineStoppedError,
    TokenEvent,
)
from llmquant.serve.sampling import SamplingParams, apply_penalties, choose_token, make_generator, token_logprobs

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    on_event: Callable[[TokenEvent], None]
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    counts: collections.Counter = field(default_factory=collections.Counter)
    cached: int = 0  # tokens of this sequence in the KV cache
    cancelled: bool = False
    finished: bool = False


class RequestHandle:
    """What `submit` returns: the request id and a way to cancel it (frees its slot and KV rows)."""

    def __init__(self, engine: "Engine", seq: _Sequence):
        self._engine, self._seq = engine, seq
        self.request_id = seq.request_id

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine._wake()


class Engine:
    def __init__(self, loaded, *, max_batch_size: int = DEFAULT_MAX_BATCH, max_waiting: int = DEFAULT_MAX_WAITING,
                 max_model_len: int | None = None, max_prefill_tokens: int | None = None,
                 prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS, lean_forward: bool = True):
        """`max_prefill_tokens`: padded prompt tokens computed per step, and so the chunk size of a
        longer prompt (default: limits.default_max_prefill_tokens for the model's device);
        `prefix_cache_tokens`: tokens of prompt keys and values kept for reuse (0: no prefix cache)."""
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device = next(self.model.parameters()).device
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.max_prefill_tokens = max_prefill_tokens or default_max_prefill_tokens(self.device.type)
        self._prefix = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        # Sliding-window attention needs no limit here: the cache keeps every column and the
        # window is a mask. transformers builds it from cache columns (query column minus key
        # column below the window), and every row's tokens sit right-aligned in contiguous
        # columns (left padding only), so a column distance is the row's position distance.
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # The model's forward: for Llama-shaped models a lean one (same math, far fewer steps per
        # token), checked against transformers' own first; transformers' otherwise (forward/).
        probe = probe_ids(self.tokenizer) if lean_forward else []
        self.forward = select_forward(self.model, self.max_model_len, probe, lean=lean_forward)
        release_freed_memory()  # what building it freed goes back to the OS, not into the heap
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._jobs: list[PrefillJob] = []  # prefills in progress (chunked prompts span several steps)
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 where the cache column holds a token of the row
        self._cond = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="llmquant-engine", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[TokenEvent], None],
               request_id: str | None = None) -> RequestHandle:
        """Queue a request; `on_event` is called from the engine thread for every token."""
        max_tokens = self.check_length(len(prompt_ids), params.max_tokens)
        seq = _Sequence(request_id=request_id or f"req-{next(self._ids)}", prompt_ids=list(prompt_ids),
                        params=params, max_tokens=max_tokens, on_event=on_event,
                        generator=make_generator(params.seed),
                        detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop))
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("The server is shutting down and accepts no new requests.")
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusyError(f"The server is busy: {len(self._waiting)} requests are already waiting. "
                                      "Retry shortly.")
            self._waiting.append(seq)
            self._cond.notify()
        return RequestHandle(self, seq)

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The number of tokens the request may generate; raises when it cannot fit the context."""
        if prompt_tokens == 0:
            raise ContextLengthError("The prompt is empty.", "prompt")
        if prompt_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{prompt_tokens} tokens, which leaves no room for the completion. Shorten the prompt.", "prompt")
        if max_tokens is None:
            return self.max_model_len - prompt_tokens
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                "completion). Reduce the prompt or max_tokens.", "max_tokens")
        return max_tokens

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Blocking iterator over one request's events (the Python API and eval use this)."""
        import queue

        ids = self.tokenizer(prompt, add_special_tokens=True).input_ids if isinstance(prompt, str) else prompt
        events: queue.Queue[TokenEvent] = queue.Queue()
        handle = self.submit(ids, params or SamplingParams(), events.put)
        try:
            while True:
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            handle.cancel()  # no-op once finished; frees the slot if the caller stopped early

    @property
    def num_running(self) -> int:
        """Sequences being prefilled or decoded (vLLM counts both as running)."""
        return len(self._running) + sum(len(job.seqs) for job in self._jobs)

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache (0 without one)."""
        return self._prefix.queries if self._prefix else 0

    @property
    def prefix_cache_hits(self) -> int:
        """Of those, tokens whose keys and values came from the cache instead of being computed."""
        return self._prefix.hits if self._prefix else 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """hits / queries (0.0 before any lookup)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain`, let queued and running ones finish first."""
        with self._cond:
            self._stopping = True
            if not drain:
                for seq in itertools.chain(self._waiting, self._running, *(job.seqs for job in self._jobs)):
                    seq.cancelled = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the loop -------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                taken = self._take_waiting()
                if taken is None:
                    return
                try:
                    self._start_prefills(*taken)
                    self._prefill_step()
                    self._drop_done()
                    if self._running:
                        self._decode_step()
                        self._drop_done()
                except Exception:  # a bug or an out-of-memory: fail the requests, keep serving
                    log.exception("engine step failed")
                    self._fail_all(taken[0])

    def _take_waiting(self) -> tuple[list[_Sequence], list[list]] | None:
        """Requests to start prefilling now, with the prefix-cache blocks each one's prompt
        starts with; blocks while there is nothing to do; None when shut down."""
        with self._cond:
            while not self._running and not self._waiting and not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait(IDLE_WAIT_S)
            admitted, chains, longest = [], [], 0
            in_flight = self.num_running
            while self._waiting and in_flight + len(admitted) < self.max_batch_size:
                seq = self._waiting[0]
                chain = self._cached_prefix(seq)
                todo = len(seq.prompt_ids) - len(chain) * self._prefix.block_size if chain else len(seq.prompt_ids)
                # Prompts are prefilled together, left-padded to the longest part still to
                # compute: that padded size is what the forward passes cost in time and memory.
                padded = (len(admitted) + 1) * max(longest, todo)
                if admitted and padded > self.max_prefill_tokens:
                    break
                self._waiting.popleft()
                if seq.cancelled:
                    self._finish(seq, FINISH_ABORT)
                    continue
                admitted.append(seq)
                chains.append(chain)
                longest = max(longest, todo)
            return admitted, chains

    def _cached_prefix(self, seq: _Sequence) -> list:
        """The prefix-cache blocks `seq`'s prompt starts with. Never the whole prompt: its last
        token is computed, for the logits of the first generated token. None for prompt
        logprobs, which need the logits at every prompt position."""
        if self._prefix is None or seq.params.prompt_logprobs:
            return []
        return self._prefix.lookup(seq.prompt_ids, len(seq.prompt_ids) - 1)

    def _start_prefills(self, admitted: list[_Sequence], chains: list[list]) -> None:
        for group in _prefill_groups(list(zip(admitted, chains))):
            seqs = [seq for seq, _ in group]
            lengths = [len(seq.prompt_ids) for seq in seqs]
            past = None
            if self._prefix is not None:
                size = self._prefix.block_size
                start, used = plan(lengths, [len(chain) * size for _, chain in group])
                for (seq, _), n in zip(group, used):
                    if not seq.params.prompt_logprobs:
                        self._prefix.count(len(seq.prompt_ids), n)
                if start:
                    past = self._prefix.gather([chain for _, chain in group], used, start)
            want_prompt_lp = any(s.params.prompt_logprobs for s in seqs)  # only ever alone: see _prefill_groups
            self._jobs.append(PrefillJob(seqs, self.device, past, want_prompt_lp))

    def _prefill_step(self) -> None:
        """Compute up to `max_prefill_tokens` padded prompt tokens of the prefills in progress,
        the one with the least left first, so a short prompt waits for at most one chunk of a
        long one; a job passed over in the last step goes first, so a long one is not starved
        by a stream of short ones. Chunks much smaller than the budget are not worth a pass
        over the weights: such a job waits for the next step."""
        budget, ran = self.max_prefill_tokens, False
        for job in sorted(self._jobs, key=lambda j: (not j.skipped, j.remaining)):
            keep = [i for i, s in enumerate(job.seqs) if not s.cancelled]
            if len(keep) < len(job.seqs):
                for seq in job.seqs:
                    if seq.cancelled:
                        self._finish(seq, FINISH_ABORT)
                job.keep(keep)
            if not job.seqs:
                self._jobs.remove(job)
                continue
            columns = job.columns(budget)
            cost = columns * len(job.seqs)
            if ran and (cost > budget or (cost < job.remaining and 4 * cost < self.max_prefill_tokens)):
                job.skipped = True
                continue
            job.skipped, ran = False, True
            budget -= cost
            logits = job.run(self.forward, columns)
            if logits is not None:
                self._jobs.remove(job)
                self._prefilled(job, logits)

    def _prefilled(self, job: PrefillJob, logits: torch.Tensor) -> None:
        """`job`'s prompts are done (logits (G, W or 1, V)): emit each first token, store the
        prompts' blocks in the prefix cache; the rows that go on generating join the running batch."""
        group, pads = job.seqs, job.pads
        survivors = []
        for i, (seq, pad) in enumerate(zip(group, pads)):
            seq.cached = len(seq.prompt_ids)
            prompt_lp = _prompt_logprobs(logits[i, pad:], seq.prompt_ids, seq.params.top_logprobs) \
                if seq.params.prompt_logprobs else None
            if seq.max_tokens == 0:  # scoring only
                seq.finished = True
                self._emit(seq, TokenEvent(request_id=seq.request_id, token_id=None, text="",
                                           finish_reason=FINISH_LENGTH, prompt_logprobs=prompt_lp,
                                           num_prompt_tokens=seq.cached))
                continue
            self._next_token(seq, logits[i, -1], prompt_lp)
            if not seq.finished:
                survivors.append(i)
        if self._prefix is not None:  # after the first tokens: storing is no reason to delay them
            for row, (seq, pad) in enumerate(zip(group, pads)):
                # Not prompts scored for their logprobs (perplexity windows, lm-eval's choices):
                # only generating requests look prefixes up, and they seldom start with such a text.
                if not seq.params.prompt_logprobs:
                    self._prefix.store(seq.prompt_ids, job.cache.layers, row, pad)
        if not survivors:
            return
        cache, mask = job.cache, job.mask
        lead = min(pads[i] for i in survivors)  # padding columns shared by every surviving row
        if len(survivors) < len(group) or lead:
            cache, mask = kv_cache.keep_rows(cache, survivors, lead), mask[survivors, lead:]
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            self._cache = kv_cache.merge_rows(self._cache, cache)
            self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)])
        self._running.extend(group[i] for i in survivors)

    def _decode_step(self) -> None:
        rows = self._running
        ids = torch.tensor([[s.output_ids[-1]] for s in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[s.cached] for s in rows], device=self.device)  # (B, 1)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits = self.forward(ids, positions, self._mask, self._cache, False)[:, -1]  # (B, V)
        for seq, row in zip(rows, logits):
            seq.cached += 1
            if not seq.cancelled:
                self._next_token(seq, row, None)

    def _next_token(self, seq: _Sequence, logits: torch.Tensor, prompt_lp) -> None:
        params = seq.params
        try:
            token = choose_token(apply_penalties(logits, seq.counts, params), params, seq.generator)
        except RuntimeError:  # e.g. NaN logits in this row: end this sequence, not the whole batch
            log.exception("sampling failed for %s", seq.request_id)
            self._finish(seq, FINISH_ABORT)
            return
        logprob, top = None, []
        if params.logprobs or params.top_logprobs:
            logprob, top = token_logprobs(torch.log_softmax(logits, dim=-1), token, params.top_logprobs)
        seq.output_ids.append(token)
        seq.counts[token] += 1
        finish = None
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            text, finish = seq.detok.flush(), FINISH_STOP
        else:
            text = seq.detok.add(token)
            if seq.detok.stopped_by is not None:
                finish = FINISH_STOP
            elif len(seq.output_ids) >= seq.max_tokens:
                text, finish = text + seq.detok.flush(), FINISH_LENGTH
        seq.finished = finish is not None
        self._emit(seq, TokenEvent(request_id=seq.request_id, token_id=token, text=text, logprob=logprob,
                                   top_logprobs=top, finish_reason=finish, prompt_logprobs=prompt_lp,
                                   num_prompt_tokens=len(seq.prompt_ids), num_generated=len(seq.output_ids)))

    def _drop_done(self) -> None:
        """Remove finished and cancelled rows from the batch, the mask and the KV cache."""
        keep = [i for i, s in enumerate(self._running) if not s.finished and not s.cancelled]
        if len(keep) == len(self._running):
            return
        for s in self._running:
            if s.cancelled and not s.finished:
                self._finish(s, FINISH_ABORT)
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        mask = self._mask[keep]
        lead = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # columns that are padding in every row
        self._mask = mask[:, lead:]
        self._cache = kv_cache.keep_rows(self._cache, keep, lead)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.finished = True
        self._emit(seq, TokenEvent(request_id=seq.request_id, token_id=None, text="", finish_reason=reason,
                                   num_prompt_tokens=len(seq.prompt_ids), num_generated=len(seq.output_ids)))

    def _emit(self, seq: _Sequence, event: TokenEvent) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer's bug must not stop the other requests
            log.exception("event callback of %s failed; cancelling it", seq.request_id)
            seq.cancelled = True

    def _fail_all(self, admitted: list[_Sequence]) -> None:
        for seq in itertools.chain(admitted, self._running, *(job.seqs for job in self._jobs)):
            if not seq.finished:
                self._finish(seq, FINISH_ABORT)
        self._running, self._jobs, self._cache, self._mask = [], [], None, None


def _prefill_groups(admitted: list[tuple[_Sequence, list]]) -> list[list[tuple[_Sequence, list]]]:
    """Requests (with their cached prefix blocks) that want prompt logprobs are prefilled alone
    (they need logits at every prompt position: (T, V) floats, which for a padded group would be
    G times that); the rest together."""
    alone = [[a] for a in admitted if a[0].params.prompt_logprobs]
    together = [a for a in admitted if not a[0].params.prompt_logprobs]
    return alone + ([together] if together else [])


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - mask.shape[1]
    return mask if pad == 0 else torch.cat([mask.new_zeros(mask.shape[0], pad), mask], dim=1)


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], top: int):
    """Per prompt token: None for the first, else (logprob given the tokens before, top alternatives)."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # (n - 1, V): row i predicts token i + 1
    targets = torch.tensor(prompt_ids[1:], device=logits.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    alternatives = [[] for _ in chosen]
    if top:
        values, ids = torch.topk(logprobs, top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [None] + [(c, a) for c, a in zip(chosen, alternatives)]


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids
