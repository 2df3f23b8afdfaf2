"""One asyncio event loop per process, shared by the gRPC server and the compute thread.

grpc.aio runs on one event loop (uvloop when installed). On the master a background thread runs
the loop while no step is in flight (Join, FetchShard, Status, heartbeats); the engine's step
thread `borrow()`s it for a whole step and runs it itself (run_until_complete) whenever it waits
on the network, so a frame goes from gRPC to the waiting code with no thread hand-off. A worker
has no background thread: its one thread always owns the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # plain asyncio works, ~30% slower per allreduce
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class SharedLoop:
    def __init__(self, background: bool = True) -> None:
        self.loop = new_event_loop()
        self._owner: int | None = None
        self._lock = threading.Lock()
        self._may_run = threading.Event()
        self._parked = threading.Event()
        self._closed = False
        self._thread = None
        if background:
            self._may_run.set()
            self._thread = threading.Thread(target=self._run_idle, name="tpi-grpc-loop", daemon=True)
            self._thread.start()
        else:
            self._owner = threading.get_ident()  # the creating thread always owns it

    def _run_idle(self) -> None:
        asyncio.set_event_loop(self.loop)
        while True:
            self._may_run.wait()
            if self._closed:
                return
            self.loop.run_forever()
            self._parked.set()

    @contextlib.contextmanager
    def borrow(self):
        """Park the background thread; this thread runs the loop until the block ends."""
        me = threading.get_ident()
        if self._owner == me:
            yield
            return
        with self._lock:
            self._may_run.clear()
            self._parked.clear()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._parked.wait()
            self._owner = me
            try:
                yield
            finally:
                self._owner = None
                self._may_run.set()

    def run(self, coro: Awaitable, timeout: float | None = None):
        """Run `coro` on the loop: inline when this thread owns it, else through the loop thread."""
        if self._owner == threading.get_ident():
            return self.loop.run_until_complete(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable, *args) -> None:
        """Schedule a plain callback on the loop from any thread."""
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self._closed = True
        self._may_run.set()
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
