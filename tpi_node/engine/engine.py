"""The engine: an async front (generate) over one step thread doing continuous batching.

Every step batches the decode token of every running sequence and prefill chunks of new ones
(bounded by `max_step_tokens`) into ONE forward of the cluster (`driver.step`), so a step costs
two allreduces per layer whatever the batch. Sequences join and leave between steps; the
Scheduler (engine/scheduler.py) decides which, within the KV blocks every node holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Hashable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.client import ClusterNotReady, EngineError, ErrorKind, QueueFull, TokenEvent
from tpi_node.engine.draft import DraftModel
from tpi_node.engine.head import ModelHead
from tpi_node.engine.limits import BLOCK_TOKENS, DEFAULT_LIMITS, EngineLimits
from tpi_node.engine.scheduler import Scheduler, Work
from tpi_node.engine.sequence import AsyncSink, Sequence
from tpi_node.engine.speculative import PromptLookup
from tpi_node.engine.vocab import HeadAsk, HeadResult, Row, StepAsk, step_ask
from tpi_node.errors import TpiError
from tpi_node.model.candidates import logprob
from tpi_node.model.config import ModelConfig
from tpi_node.model.grammar import GrammarCompiler, GrammarError, TokenConstraint
from tpi_node.model.sampling import Sampler
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.model.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer
from tpi_node.weights.counters import request_line, snapshot

log = logging.getLogger("tpi_node.engine")


class Driver(Protocol):
    """Runs one step over every node of the plan and returns the final-normed hidden states."""

    def step(
        self, layout: BatchLayout, x: torch.Tensor, kv_epoch: Hashable, ask: HeadAsk | None = None
    ) -> tuple[torch.Tensor, HeadResult | None]:
        """-> (hidden [T, H], the split head's answer to `ask`, engine/vocab.py). KVStale
        (nothing computed) when the nodes' KV caches are not those of `kv_epoch`."""

    def kv_blocks(self) -> int:
        """Blocks of every node's paged KV cache (the same count on every node)."""

    def kv_epoch(self) -> Hashable:
        """Changes whenever a node's KV cache starts empty (a re-plan, a node back): what the
        engine's block pool says is cached must then be forgotten."""

    def free(self, seq_ids: list[int]) -> None:
        """These sequences ended: they hold nothing on the nodes any more (idle bookkeeping)."""

    def ready(self) -> bool: ...
    def recover(self, error: BaseException) -> bool: ...
    def stats(self) -> dict: ...


def _starts(sampled: list) -> list[int]:
    """Where each sequence's rows start in the concatenation of every sequence's rows."""
    out, at = [], 0
    for _, rs in sampled:
        out.append(at)
        at += len(rs)
    return out


class KVStale(TpiError):
    """A step was refused: a node's KV cache changed since the engine planned it."""


@dataclass
class EngineCounters:
    """Totals since start (fixed size: a long-running daemon must not grow with its requests;
    latency histograms live in the server's Prometheus metrics)."""

    requests: int = 0
    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of them, found in the prefix cache
    completion_tokens: int = 0
    steps: int = 0
    drafts_proposed: int = 0  # speculative decoding: draft tokens checked
    drafts_accepted: int = 0  # of them, those the model's own sampling agreed with
    head_s: float = 0.0  # in the master's whole lm_head (unsplit; a split head's time is the runner's)


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        head: ModelHead,
        tokenizer: Tokenizer,
        driver: Driver,
        model_name: str,
        limits: EngineLimits | None = None,
        *,
        prefix_cache: bool = True,
        max_context: int | None = None,
        speculative: str = "auto",
        draft: DraftModel | None = None,
    ) -> None:
        """speculative: lookup (drafts by prompt lookup, engine/speculative.py) | draft (by the
        draft model `draft`, engine/draft.py) | auto (draft when there is one, else lookup) | off."""
        if speculative == "draft" and draft is None:
            raise ValueError("speculative decoding by a draft model needs one (--draft-model)")
        self.cfg, self.head, self.tokenizer, self.driver = cfg, head, tokenizer, driver
        self.speculative = speculative != "off"
        self.draft = draft if speculative in ("auto", "draft") else None
        self.model_name = model_name
        self.context_limit = min(cfg.max_position, max_context or cfg.max_position)  # --max-context
        self.limits = limits or DEFAULT_LIMITS
        self.counters = EngineCounters()
        self.eos_ids = set(tokenizer.eos_token_ids) | set(cfg.eos_token_ids)
        self._ids = itertools.count(1)
        self.grammars = GrammarCompiler(tokenizer.to_json, head.vocab_size, sorted(self.eos_ids))
        # token masks of constrained sequences are computed here while the cluster runs the step
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tpi-grammar")
        self._kv_epoch = driver.kv_epoch()
        self.scheduler = Scheduler(self.limits, driver.kv_blocks(), prefix_cache)
        self._cancelled: set[int] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tpi-engine", daemon=True)
        self._thread.start()

    # ---- front ------------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        """The longest sequence served: the model's context, --max-context, and what every
        node's KV cache holds, whichever is least."""
        return min(self.context_limit, self.driver.kv_blocks() * BLOCK_TOKENS)

    @property
    def hidden_size(self) -> int:
        """The length of an embedding (Engine.embed)."""
        return self.cfg.hidden_size

    def ready(self) -> bool:
        return not self._stop and self.driver.ready()

    def _submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        sink,
        pooling: bool = False,
        constraint: TokenConstraint | None = None,
    ) -> Sequence:
        """`constraint`: params.grammar compiled (`_compile`)."""
        if not self.ready():
            raise ClusterNotReady()
        if not prompt_ids:
            raise EngineError("the prompt is empty", ErrorKind.INVALID_PROMPT)
        if len(prompt_ids) >= self.max_context:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens; the longest sequence served is {self.max_context} tokens "
                "(the model's context, --max-context, or the KV cache --memory-budget leaves)",
                ErrorKind.CONTEXT_LENGTH,
            )
        seq_id = next(self._ids)
        seq = Sequence(
            seq_id,
            request_id,
            list(prompt_ids),
            len(prompt_ids),
            params,
            Sampler(params, prompt_ids),
            IncrementalDecoder(self.tokenizer),
            StopMatcher(params.stop),
            sink,
            node_counters=snapshot(self.driver.stats()),
            constraint=constraint,
            pooling=pooling,
            drafter=self._drafter(seq_id),
            max_len=self.max_context,
        )
        with self._cv:
            if len(self.scheduler.waiting) >= self.limits.max_queue:
                raise QueueFull()
            self.scheduler.add(seq)
            self.counters.requests += 1
            self._cv.notify()
        return seq

    def _drafter(self, seq_id: int):
        if not self.speculative:
            return None
        return PromptLookup() if self.draft is None else self.draft.drafter(seq_id)

    def cancel(self, seq_id: int) -> None:
        with self._cv:
            self._cancelled.add(seq_id)
            self._cv.notify()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str = ""
    ) -> AsyncIterator[TokenEvent]:
        sink = AsyncSink(asyncio.get_running_loop())
        constraint = None
        if params.grammar is not None:  # off the event loop: the first one builds the token trie
            constraint = await asyncio.to_thread(self._compile, params)
        seq = self._submit(prompt_ids, params, request_id, sink, constraint=constraint)
        done = False
        try:
            while True:
                item = await sink.q.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
                if item.finish_reason:
                    done = True
                    return
        finally:
            if not done:
                self.cancel(seq.seq_id)

    def _compile(self, params: SamplingParams) -> TokenConstraint:
        try:
            return self.grammars.compile(params.grammar)
        except GrammarError as exc:
            raise EngineError(str(exc), ErrorKind.INVALID_GRAMMAR) from None

    async def embed(self, prompts: list[list[int]], request_id: str = "") -> list[list[float]]:
        """One embedding per prompt: the MEAN over the prompt's positions of the final-normed
        hidden states (what `driver.step` returns, after the model's last RMSNorm), then scaled
        to unit L2 norm. Each prompt is one prefill-only sequence, all submitted at once so they
        share steps with each other and with generation (continuous batching); none takes its
        prefix from the prefix cache (every row is needed), and their blocks go back at the end."""
        loop, seqs = asyncio.get_running_loop(), []
        try:
            for i, ids in enumerate(prompts):
                sink = AsyncSink(loop)
                seqs.append(self._submit(ids, SamplingParams(max_tokens=0), f"{request_id}-{i}", sink, pooling=True))
            out = []
            for s in seqs:  # each sink gets one item: its embedding's event, or the error
                item = await s.sink.q.get()
                if isinstance(item, BaseException):
                    raise item
                out.append(item.embedding)
            return out
        finally:
            for s in seqs:
                if not s.finished:
                    self.cancel(s.seq_id)

    def generate_sync(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """`generate` for a thread without an event loop (the CLI, tests): the same stream, run
        on a private loop; closing this iterator early cancels the sequence just the same."""
        loop = asyncio.new_event_loop()
        stream = self.generate(prompt_ids, params)
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()

    def stats(self) -> dict:
        with self._cv:
            sch = self.scheduler
            pool, waiting, running, preemptions = sch.pool, len(sch.waiting), len(sch.running), sch.preemptions
            kv = {
                "blocks": pool.num_blocks,
                "used": pool.used(),
                "free": len(pool.free),
                "cached": len(pool.cached),
                "block_tokens": pool.capacity_tokens // max(1, pool.num_blocks),
                "prefix_hit_rate": pool.stats.hit_rate,
                "evictions": pool.stats.evictions,
                "preemptions": preemptions,
            }
        c = self.counters
        return {
            "waiting": waiting,
            "running": running,
            "requests": c.requests,
            "finished": c.finished,
            "failed": c.failed,
            "prompt_tokens": c.prompt_tokens,
            "cached_prompt_tokens": c.cached_prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "steps": c.steps,
            "speculative": {
                "proposed": c.drafts_proposed,
                "accepted": c.drafts_accepted,
                **({"draft": self.draft.stats_dict()} if self.draft is not None else {}),
            },
            "kv": kv,
            "nodes": self.driver.stats(),
        }

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        self._mask_pool.shutdown(wait=False)
        if self.draft is not None and not self._thread.is_alive():
            self.draft.close()

    # ---- step thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        sch = self.scheduler
        while True:
            with self._cv:
                while not self._stop and not sch.waiting and not sch.running and not self._cancelled:
                    self._cv.wait()
                if self._stop:
                    self._fail_all(EngineError("the server is shutting down", ErrorKind.SHUTDOWN))
                    return
                self._reap_cancelled()
                self._follow_kv_epoch()
                epoch = self._kv_epoch
                work = self.scheduler.schedule()
                layout = BatchLayout(
                    tuple(s.seq_id for s, _ in work),
                    tuple(s.cached for s, _ in work),
                    tuple(len(c) for _, c in work),
                    self.scheduler.tables(work),
                )
            if work:
                self._step(work, layout, epoch)
            elif sch.waiting and not sch.running:  # the head of the queue can never be admitted
                with self._cv:
                    self._fail_too_long()

    def _follow_kv_epoch(self) -> None:
        """Caller holds _cv. A node's KV cache started empty: forget the pool and replay."""
        epoch = self.driver.kv_epoch()
        if epoch != self._kv_epoch:
            self._kv_epoch = epoch
            self.scheduler.reset(self.driver.kv_blocks())
            self._fail_too_long()

    def _fail_too_long(self) -> None:
        """Caller holds _cv. Sequences longer than the KV cache now holds (after a re-plan to fewer
        or smaller nodes) can never run: fail them, each with the limit."""
        cap = self.scheduler.pool.capacity_tokens
        for s in [s for s in self.scheduler.waiting if len(s.tokens) > cap]:
            self._remove(s)
            s.sink.put(
                EngineError(
                    f"the sequence has {len(s.tokens)} tokens; the cluster's KV cache now holds {cap}",
                    ErrorKind.CONTEXT_LENGTH,
                )
            )
            self.counters.failed += 1

    def _reap_cancelled(self) -> None:
        """Caller holds _cv."""
        sch = self.scheduler
        gone = [s for s in list(sch.running) + list(sch.waiting) if s.seq_id in self._cancelled]
        self._cancelled.clear()
        for s in gone:
            s.cancelled = True
            self._remove(s)
        if gone:
            self.driver.free([s.seq_id for s in gone])

    def _step(self, work: Work, layout: BatchLayout, epoch) -> None:
        masks = self._start_masks(work)
        asked = step_ask(work, self.head.vocab_size) if self.head.split else None
        try:
            x = self.head.embed([t for _, c in work for t in c])
            hidden, vocab = self.driver.step(layout, x, epoch, asked.ask if asked and asked.ask else None)
        except KVStale:
            return  # the next round follows the new epoch and replays
        except Exception as e:
            self._on_step_error(e)
            return
        allowed = masks.result() if masks is not None else {}
        self.counters.steps += 1
        with self._cv:
            self.scheduler.computed(work)
        self._every_row(work, layout, hidden, asked, vocab)
        rows, sampled = layout.last_rows(), []
        for (s, _), row in zip(work, rows):
            if s.cached == len(s.tokens):  # the sequence's last known token went through
                if s.prefill_only:
                    self._end_prefill(s)
                else:  # the rows of its last token and of each draft after it
                    sampled.append((s, list(range(row - len(s.draft), row + 1))))
        if sampled:
            if asked is None:
                t0 = time.perf_counter()
                logits = self.head.logits(hidden[[r for _, rs in sampled for r in rs]])  # [sum of rows, V]
                self.counters.head_s += time.perf_counter() - t0
                per_seq = [list(logits[a : a + len(rs)]) for a, (_, rs) in zip(_starts(sampled), sampled)]
            else:  # the split head's merged candidates, or whole rows where sampling needs them
                per_seq = [asked.rows_of(s.seq_id, vocab) for s, _ in sampled]
            for (s, _), outs in zip(sampled, per_seq):
                mask = allowed.get(s.seq_id)
                if mask is not None:  # (a constrained sequence's rows are always whole)
                    outs = [lg.masked_fill(~mask, float("-inf")) for lg in outs]
                self._verify(s, outs)
            if self.draft is not None:
                self._draft_ahead([s for s, _ in sampled])

    def _draft_ahead(self, seqs: list[Sequence]) -> None:
        """The draft model drafts the next step's tokens of the sequences just sampled, all in the
        same forwards (their `propose` in the next schedule finds them ready)."""
        wants = []
        for s in seqs:
            if s.finished or s.drafter is None or s.constraint is not None or s.seq_id in self._cancelled:
                continue
            room = s.draft_room(self.limits.max_step_tokens)
            if room > 0:
                wants.append((s.drafter, s.tokens, min(room, s.drafter.k)))
        if wants:
            self.draft.prepare(wants)

    def _verify(self, s: Sequence, logits: list[Row]) -> None:
        """logits: 1 + drafts rows ([V] logits or a split head's candidates): sample row after row,
        as plain decoding would, while each sampled token is the draft whose KV the next row saw;
        the first that differs ends the step (it is still the model's own sample: one draw per
        token, so seeded text is unchanged)."""
        draft, accepted = s.draft, 0
        s.drafts_proposed += len(draft)  # counted before a token can end it (its log line says them)
        self.counters.drafts_proposed += len(draft)
        for i in range(len(logits)):
            if i:  # row i saw draft i - 1, which the sampled token matched
                accepted += 1
                s.drafts_accepted += 1
                self.counters.drafts_accepted += 1
            self._advance(s, logits[i])
            if s.finished or i == len(draft) or s.tokens[-1] != draft[i]:
                break
        if draft:
            s.drafter.record(len(draft), accepted)
            if not s.finished:
                with self._cv:
                    self.scheduler.accepted(s, accepted)
        s.draft = []

    def _start_masks(self, work: Work) -> concurrent.futures.Future | None:
        """The grammar masks of the constrained sequences this step samples, computed on the
        grammar thread while the cluster runs the step (whose torch kernels and gRPC waits leave
        the interpreter free)."""
        due = [s for s, c in work if s.constraint is not None and s.cached + len(c) == len(s.tokens)]
        if not due:
            return None

        def masks() -> dict[int, torch.Tensor]:
            out = {s.seq_id: s.constraint.allowed() for s in due}
            return {k: m for k, m in out.items() if m.any()}  # a matcher in error allows nothing: leave it free

        return self._mask_pool.submit(masks)

    def _every_row(
        self, work: Work, layout: BatchLayout, hidden: torch.Tensor, asked: StepAsk | None, vocab: HeadResult | None
    ) -> None:
        """The sequences that need every row of their chunks: pool an embedding's hidden states,
        record the logprob of each next prompt token. Both are kept by position, so a chunk
        computed again (after a preemption) adds nothing twice."""
        at = 0
        for (s, chunk), past in zip(work, layout.past_lens):
            rows, at = hidden[at : at + len(chunk)], at + len(chunk)  # positions past .. past+len-1
            if s.pooling and past + len(chunk) > s.pooled_upto:
                part = rows[max(0, s.pooled_upto - past) :].double().sum(0)  # [H]
                s.pooled = part if s.pooled is None else s.pooled + part
                s.pooled_upto = past + len(chunk)
            if s.prompt_lps is not None and asked is not None:
                k = s.params.prompt_logprobs or 0
                for pos, i in asked.prompt.get(s.seq_id, ()):  # the split head's candidates
                    c = vocab.candidates[i]
                    top = [(t, logprob(v, c.lse)) for t, v in zip(c.ids[:k], c.logits[:k])] if k else None
                    s.prompt_lps[pos] = (logprob(c.target_logit, c.lse), top)
            elif s.prompt_lps is not None:
                self._prompt_logprobs(s, past, rows)

    def _prompt_logprobs(self, s: Sequence, past: int, rows: torch.Tensor, block: int = 256) -> None:
        """Row j (position past+j) gives the logprob of prompt token past+j+1 (log_softmax of the
        raw logits, as the sampler reports), and the top k there."""
        lps, k = s.prompt_lps, s.params.prompt_logprobs or 0
        n = min(len(rows), s.num_prompt - 1 - past)  # rows whose next token is a prompt token
        first = 0
        while first < n and lps[past + 1 + first] is not None:  # done before a preemption
            first += 1
        for a in range(first, n, block):  # [block, V] float32 logits at a time
            b = min(n, a + block)
            logprobs = torch.log_softmax(self.head.logits(rows[a:b]), dim=-1)
            target = torch.tensor(s.tokens[past + 1 + a : past + 1 + b], device=logprobs.device)
            chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
            if k:
                vals, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
                tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
            for j in range(b - a):
                lps[past + 1 + a + j] = (chosen[j], tops[j] if k else None)

    def _end_prefill(self, s: Sequence) -> None:
        """A prefill-only sequence's prompt went through: one event without a token, then done."""
        s.t_first = time.monotonic()
        self.counters.prompt_tokens += s.num_prompt
        self.counters.cached_prompt_tokens += s.cached_prompt or 0
        embedding = None
        if s.pooling:
            mean = s.pooled / s.num_prompt
            embedding = (mean / mean.norm().clamp_min(1e-12)).float().tolist()
        self._finish(s)
        s.emit(
            TokenEvent(
                None,
                "",
                finish_reason="length",
                cached_tokens=s.cached_prompt or 0,
                embedding=embedding,
            )
        )

    def _advance(self, s: Sequence, logits: Row) -> None:
        """logits [V] of s's next token (-inf where its grammar forbids a token), or a split head's
        merged candidates for it."""
        if isinstance(logits, torch.Tensor):
            res = s.sampler(logits, s.generated)
        else:
            res = s.sampler.choose(logits, s.generated, self.head.vocab_size)
        if s.constraint is not None and not s.constraint.accept(res.token_id):
            log.error("request %s: the grammar refused token %d: %s", s.request_id, res.token_id, s.constraint.error)
        now = time.monotonic()
        first = s.t_first is None
        if first:
            s.t_first = now
            self.counters.prompt_tokens += s.num_prompt
            self.counters.cached_prompt_tokens += s.cached_prompt or 0
        s.tokens.append(res.token_id)
        self.counters.completion_tokens += 1
        p, finish, text = s.params, None, ""
        if (res.token_id in self.eos_ids and not p.ignore_eos) or res.token_id in p.stop_token_ids:
            finish, text = "stop", s.stopper.flush()
        else:
            text, stopped = s.stopper.feed(s.decoder.push(res.token_id))
            if stopped:
                finish = "stop"
            elif s.constraint is not None and s.constraint.finished:  # the grammar is complete
                finish = "stop"
                tail, _ = s.stopper.feed(s.decoder.flush())
                text += tail + s.stopper.flush()
            elif len(s.generated) >= p.max_tokens or len(s.tokens) >= self.max_context:
                tail, _ = s.stopper.feed(s.decoder.flush())
                text += tail + s.stopper.flush()
                finish = "stop" if s.stopper.stopped else "length"  # the held-back tail held a stop string
        if finish:  # free its KV cache on every node first: a client that saw the end finds it gone
            self._finish(s)
        s.emit(
            TokenEvent(
                res.token_id,
                text,
                res.logprob,
                res.top_logprobs,
                finish,
                cached_tokens=(s.cached_prompt or 0) if first else None,
            )
        )

    def _finish(self, s: Sequence) -> None:
        s.finished = True
        elapsed = time.monotonic() - s.t_arrive
        n = len(s.generated)
        self.counters.finished += 1
        with self._cv:
            self._remove(s)
        self.driver.free([s.seq_id])
        log.info(
            "request %s: %d prompt + %d generated tokens in %.2f s (ttft %.3f s)%s",
            s.request_id or s.seq_id,
            s.num_prompt,
            n,
            elapsed,
            (s.t_first or 0) - s.t_arrive,
            f", {s.drafts_accepted} of {s.drafts_proposed} draft tokens accepted" if s.drafts_proposed else "",
        )
        if log.isEnabledFor(logging.INFO):
            log.info(request_line(s.request_id or s.seq_id, s.node_counters, snapshot(self.driver.stats())))

    def _on_step_error(self, e: Exception) -> None:
        """A node failed mid-step. When the driver can re-plan over the survivors, replay every
        running sequence's tokens into the new nodes' caches and go on; else fail them."""
        log.error("step failed: %s", e)
        try:
            recovered = self.driver.recover(e)
        except Exception as e2:
            log.error("recovery failed: %s", e2)
            recovered = False
        with self._cv:
            if recovered:  # new caches on every node: replay prompt + generated, sampling resumes
                self._kv_epoch = self.driver.kv_epoch()
                self.scheduler.reset(self.driver.kv_blocks())
                self._fail_too_long()
                return
            err = (
                e
                if isinstance(e, EngineError)
                else EngineError(f"the cluster failed during generation: {e}", ErrorKind.CLUSTER_FAILED)
            )
            failed = list(self.scheduler.running)
            for s in failed:
                s.sink.put(err)
                self.counters.failed += 1
                self._remove(s)
        self.driver.free([s.seq_id for s in failed])

    def _fail_all(self, err: EngineError) -> None:
        for s in list(self.scheduler.running) + list(self.scheduler.waiting):
            s.sink.put(err)
            self._remove(s)

    def _remove(self, s: Sequence) -> None:
        """Step thread. The sequence ended: its blocks go back, and what its drafter holds (the
        draft model's KV)."""
        self.scheduler.remove(s)
        if s.drafter is not None:
            s.drafter.release()
