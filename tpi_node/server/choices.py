"""One choice of a request as the HTTP layer sees it (one engine sequence), and running several
of them together.

A `ChoiceStream` owns the engine's async iterator: `start()` pulls the first event eagerly so that
QueueFull / ClusterNotReady become an HTTP status before any byte of a stream is sent; `close()`
closes the iterator (which cancels the sequence and frees its KV cache on every node) and is
shielded so that it also completes while the request task is being cancelled by a disconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request

from tpi_node.engine.client import EngineClient, TokenEvent
from tpi_node.model.sampling_params import SamplingParams
from tpi_node.server.metrics import ServerMetrics

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


class ChoiceStream:
    def __init__(
        self,
        engine: EngineClient,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        index: int,
        metrics: ServerMetrics,
        arrival: float,
    ) -> None:
        self.engine, self.prompt_ids, self.params = engine, prompt_ids, params
        self.request_id, self.index, self.metrics, self.arrival = request_id, index, metrics, arrival
        self.events: list[TokenEvent] = []  # every token received so far
        self.first: TokenEvent | None = None  # the first event (cached tokens, prompt logprobs)
        self.finish_reason: str | None = None
        self.first_t: float | None = None
        self.last_t: float | None = None
        self._it: AsyncIterator[TokenEvent] | None = None
        self._pending: TokenEvent | None = None  # the first event, pulled by start()
        self._done = False
        self._closed = False
        metrics.sequence_started()  # admitted: counts against the queue bound until close()

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine took from the prefix cache (told with the first token)."""
        return (self.first.cached_tokens or 0) if self.first is not None else 0

    @property
    def prompt_logprobs(self):
        """One entry per prompt token (None for the first), when the params asked for them."""
        return self.first.prompt_logprobs if self.first is not None else None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    def _record(self, ev: TokenEvent) -> TokenEvent:
        now = time.perf_counter()
        if self.first_t is None:
            self.first_t = now
        self.last_t = now
        if self.first is None:
            self.first = ev
        if ev.token_id is not None:  # a prefill-only sequence's one event carries no token
            self.events.append(ev)
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
        return ev

    async def _next(self) -> TokenEvent | None:
        try:
            return self._record(await self._it.__anext__())
        except StopAsyncIteration:
            self._done = True
            self.finish_reason = self.finish_reason or "stop"
            return None

    async def start(self) -> None:
        self._it = aiter(self.engine.generate(self.prompt_ids, self.params, self.request_id))
        self._pending = await self._next()

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """Token events from the first one on; ends after the event carrying finish_reason (an
        event without a token, that of a prefill-only sequence, is not yielded)."""
        ev, self._pending = self._pending, None
        while ev is not None:
            if ev.token_id is not None:
                yield ev
            if ev.finish_reason:
                return
            ev = await self._next()

    async def collect(self) -> ChoiceStream:
        async for _ in self.stream():
            pass
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            aclose = getattr(self._it, "aclose", None)
            if aclose is not None and not self._done:
                try:
                    await aclose()
                except Exception:
                    pass
        self.metrics.sequence_finished()
        if self._it is not None:
            self.metrics.observe_sequence(
                arrival=self.arrival, first=self.first_t, last=self.last_t, tokens=len(self.events)
            )


async def close_all(seqs: list[ChoiceStream]) -> None:
    for s in seqs:
        await s.close()


async def start_all(seqs: list[ChoiceStream]) -> None:
    """Start every sequence; on any failure close them all and re-raise the first error."""
    try:
        if len(seqs) == 1:
            await seqs[0].start()
        else:
            await asyncio.gather(*(s.start() for s in seqs))
    except BaseException:
        await close_all(seqs)
        raise


async def merged(seqs: list[ChoiceStream]) -> AsyncIterator[tuple[ChoiceStream, TokenEvent | None]]:
    """Interleave the events of several sequences as they come; (seq, None) marks a sequence's
    end. An error in any sequence is raised here (the caller closes all of them)."""
    if len(seqs) == 1:
        async for ev in seqs[0].stream():
            yield seqs[0], ev
        yield seqs[0], None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(seq: ChoiceStream) -> None:
        try:
            async for ev in seq.stream():
                await queue.put((seq, ev))
            await queue.put((seq, None))
        except Exception as exc:
            await queue.put((seq, exc))

    tasks = [asyncio.create_task(pump(s)) for s in seqs]
    try:
        remaining = len(seqs)
        while remaining:
            seq, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                remaining -= 1
            yield seq, item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()
