"""The engine: an async front (generate) over one step thread doing continuous batching.

Every step batches the decode token of every running sequence and prefill chunks of new ones
(bounded by `max_step_tokens`) into ONE forward of the cluster (`driver.step`), so a step costs
two allreduces per layer whatever the batch. Sequences join and leave between steps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from tpi_node.engine.batch import BatchLayout
from tpi_node.engine.client import ClusterNotReady, EngineError, ErrorKind, QueueFull, TokenEvent
from tpi_node.engine.head import ModelHead
from tpi_node.engine.limits import DEFAULT_LIMITS, EngineLimits
from tpi_node.engine.sequence import AsyncSink, Sequence
from tpi_node.model.config import ModelConfig
from tpi_node.model.sampling import Sampler
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.model.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer
from tpi_node.weights.counters import request_line, snapshot

log = logging.getLogger("tpi_node.engine")


class Driver(Protocol):
    """Runs one step over every node of the plan and returns the final-normed hidden states."""

    def step(self, layout: BatchLayout, x: torch.Tensor) -> torch.Tensor: ...
    def free(self, seq_ids: list[int]) -> None: ...
    def ready(self) -> bool: ...
    def recover(self, error: BaseException) -> bool: ...
    def stats(self) -> dict: ...


@dataclass
class EngineCounters:
    """Totals since start (fixed size: a long-running daemon must not grow with its requests;
    latency histograms live in the server's Prometheus metrics)."""

    requests: int = 0
    finished: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        head: ModelHead,
        tokenizer: Tokenizer,
        driver: Driver,
        model_name: str,
        limits: EngineLimits | None = None,
    ) -> None:
        self.cfg, self.head, self.tokenizer, self.driver = cfg, head, tokenizer, driver
        self.model_name = model_name
        self.max_context = cfg.max_position
        self.limits = limits or DEFAULT_LIMITS
        self.counters = EngineCounters()
        self.eos_ids = set(tokenizer.eos_token_ids) | set(cfg.eos_token_ids)
        self._ids = itertools.count(1)
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._cancelled: set[int] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tpi-engine", daemon=True)
        self._thread.start()

    # ---- front ------------------------------------------------------------------------------
    def ready(self) -> bool:
        return not self._stop and self.driver.ready()

    def _submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sink) -> Sequence:
        if not self.ready():
            raise ClusterNotReady()
        if not prompt_ids:
            raise EngineError("the prompt is empty", ErrorKind.INVALID_PROMPT)
        if len(prompt_ids) >= self.max_context:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_context}",
                ErrorKind.CONTEXT_LENGTH,
            )
        seq = Sequence(
            next(self._ids),
            request_id,
            list(prompt_ids),
            len(prompt_ids),
            params,
            Sampler(params, prompt_ids),
            IncrementalDecoder(self.tokenizer),
            StopMatcher(params.stop),
            sink,
            node_counters=snapshot(self.driver.stats()),
        )
        with self._cv:
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull()
            self._waiting.append(seq)
            self.counters.requests += 1
            self._cv.notify()
        return seq

    def cancel(self, seq_id: int) -> None:
        with self._cv:
            self._cancelled.add(seq_id)
            self._cv.notify()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str = ""
    ) -> AsyncIterator[TokenEvent]:
        sink = AsyncSink(asyncio.get_running_loop())
        seq = self._submit(prompt_ids, params, request_id, sink)
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
            waiting, running = len(self._waiting), len(self._running)
        c = self.counters
        return {
            "waiting": waiting,
            "running": running,
            "requests": c.requests,
            "finished": c.finished,
            "failed": c.failed,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "steps": c.steps,
            "nodes": self.driver.stats(),
        }

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ---- step thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running and not self._cancelled:
                    self._cv.wait()
                if self._stop:
                    self._fail_all(EngineError("the server is shutting down", ErrorKind.SHUTDOWN))
                    return
                self._reap_cancelled()
                while self._waiting and len(self._running) < self.limits.max_running:
                    self._running.append(self._waiting.pop(0))
                batch = list(self._running)
            if batch:
                self._step(batch)

    def _reap_cancelled(self) -> None:
        gone = [s for s in self._running + self._waiting if s.seq_id in self._cancelled]
        self._cancelled.clear()
        for s in gone:
            s.cancelled = True
            if s in self._running:
                self._running.remove(s)
            else:
                self._waiting.remove(s)
        if any(s.cached for s in gone):
            self._free([s.seq_id for s in gone if s.cached])

    def _free(self, ids: list[int]) -> None:
        try:
            self.driver.free(ids)
        except Exception as e:  # a node that is gone has nothing left to free
            log.warning("freeing sequences %s failed: %s", ids, e)

    def _plan_step(self, batch: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Decode tokens first (latency), then prefill chunks within the step's token budget."""
        budget, work = self.limits.max_step_tokens, []
        for s in sorted(batch, key=lambda s: len(s.tokens) - s.cached > 1):
            if budget <= 0:
                break
            chunk = s.next_chunk(min(budget, self.limits.prefill_chunk))
            work.append((s, chunk))
            budget -= len(chunk)
        return work

    def _step(self, batch: list[Sequence]) -> None:
        work = self._plan_step(batch)
        layout = BatchLayout(
            tuple(s.seq_id for s, _ in work), tuple(s.cached for s, _ in work), tuple(len(c) for _, c in work)
        )
        try:
            x = self.head.embed([t for _, c in work for t in c])
            hidden = self.driver.step(layout, x)
        except Exception as e:
            self._on_step_error(e)
            return
        self.counters.steps += 1
        rows, sampled = layout.last_rows(), []
        for (s, chunk), row in zip(work, rows):
            s.cached += len(chunk)
            if s.cached == len(s.tokens):  # the sequence's last known token went through
                sampled.append((s, row))
        if sampled:
            logits = self.head.logits(hidden[[r for _, r in sampled]])  # [B, V]
            for (s, _), lg in zip(sampled, logits):
                self._advance(s, lg)

    def _advance(self, s: Sequence, logits: torch.Tensor) -> None:
        res = s.sampler(logits, s.generated)
        now = time.monotonic()
        if s.t_first is None:
            s.t_first = now
            self.counters.prompt_tokens += s.num_prompt
        s.tokens.append(res.token_id)
        self.counters.completion_tokens += 1
        p, finish, text = s.params, None, ""
        if (res.token_id in self.eos_ids and not p.ignore_eos) or res.token_id in p.stop_token_ids:
            finish, text = "stop", s.stopper.flush()
        else:
            text, stopped = s.stopper.feed(s.decoder.push(res.token_id))
            if stopped:
                finish = "stop"
            elif len(s.generated) >= p.max_tokens or len(s.tokens) >= self.max_context:
                finish = "length"
                tail, _ = s.stopper.feed(s.decoder.flush())
                text += tail + s.stopper.flush()
        if finish:  # free its KV cache on every node first: a client that saw the end finds it gone
            self._finish(s)
        s.emit(TokenEvent(res.token_id, text, res.logprob, res.top_logprobs, finish))

    def _finish(self, s: Sequence) -> None:
        s.finished = True
        elapsed = time.monotonic() - s.t_arrive
        n = len(s.generated)
        self.counters.finished += 1
        with self._cv:
            if s in self._running:
                self._running.remove(s)
        self._free([s.seq_id])
        log.info(
            "request %s: %d prompt + %d generated tokens in %.2f s (ttft %.3f s)",
            s.request_id or s.seq_id,
            s.num_prompt,
            n,
            elapsed,
            (s.t_first or 0) - s.t_arrive,
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
            if recovered:
                for s in self._running:
                    s.cached = 0  # replay prompt + generated; sampling resumes after the last
                return
            err = (
                e
                if isinstance(e, EngineError)
                else EngineError(f"the cluster failed during generation: {e}", ErrorKind.CLUSTER_FAILED)
            )
            for s in self._running:
                s.sink.put(err)
                self.counters.failed += 1
            ids = [s.seq_id for s in self._running if s.cached]
            self._running.clear()
        if ids:
            self._free(ids)

    def _fail_all(self, err: EngineError) -> None:
        for s in self._running + self._waiting:
            s.sink.put(err)
        self._running.clear()
        self._waiting.clear()
