"""Dynamic batching for `serve`: concurrent requests answered by one model call, with bounded work.

Requests go onto a bounded asyncio queue; one worker takes the first, collects what else arrives
within `max_wait_ms` (up to `max_batch` items, and only requests with the same `key`: generation
settings must match to share a `generate` call), runs `run(items, key)` in a worker thread so the
event loop keeps accepting requests, and answers each request from its slice of the results. A
request that does not fit the batch starts the next one. The model sees one call at a time.

Bounded: a full queue refuses at once (`Overloaded`: the server answers 503 with Retry-After); a
request not answered within `timeout_s` gives up (`TimeoutError`), and the worker skips it if it is
still queued. A batch whose call fails is retried one request at a time, so one input that makes
the model fail fails only its own request. A `Job` (a streamed generation, which needs the model
to itself) goes through the same queue and runs alone.

Written by hand: FastAPI/Starlette have no request batching, and the serving frameworks that do
(Triton, Ray Serve, TorchServe) would each be a server of their own in front of this one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Overloaded(Exception):
    """The queue is full (or the server is shutting down): answer 503 and ask to retry later."""


@dataclass(eq=False)
class Job:
    """Work that needs the model alone (a streamed generation): `fn()` runs in the worker's thread."""

    fn: Callable[[], Any]


@dataclass
class _Pending:
    items: list
    key: Any
    future: asyncio.Future


class Batcher:
    """Collects concurrent requests into batches for `run(items, key) -> results` (one per item)."""

    def __init__(
        self,
        run: Callable[[list, Any], list],
        max_batch: int,
        max_wait_ms: float,
        observe: Callable[[int], None] = lambda size: None,
        max_queue: int = 64,
        timeout_s: float = 30.0,
    ):
        self.run, self.max_batch, self.max_wait_s, self.observe = run, max_batch, max_wait_ms / 1000, observe
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.queue: asyncio.Queue[_Pending] | None = None  # made on the server's event loop
        self.busy = False  # a model call is running
        self.closed = False

    def enqueue(self, items: list, key: Any = None) -> asyncio.Future:
        """Queue a request; its future gets the results. Overloaded when the queue is full."""
        if self.queue is None:
            self.queue = asyncio.Queue(self.max_queue)
        if self.closed:
            raise Overloaded("shutting down")
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(items, key, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.max_queue} requests queued") from None
        return future

    async def submit(self, items: list, key: Any = None) -> list:
        """The results for `items`; Overloaded at once when full, TimeoutError after `timeout_s`."""
        return await asyncio.wait_for(self.enqueue(items, key), self.timeout_s)  # cancels it on timeout

    async def worker(self) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue(self.max_queue)
        loop = asyncio.get_running_loop()
        carried: _Pending | None = None
        while True:
            first = carried or await self.queue.get()
            self.busy, carried = True, None  # from here until answered: drain waits for it
            try:
                carried = await self._serve(first, loop)
            finally:
                self.busy = carried is not None

    async def _serve(self, first: _Pending, loop: asyncio.AbstractEventLoop) -> _Pending | None:
        """Answer `first` and what joins its batch; returns a request that starts the next batch."""
        carried = None
        if first.future.done():  # timed out or its client went away while queued
            return None
        if isinstance(first.key, Job):
            await self._call([first], lambda: first.key.fn(), solo=True)
            return None
        batch, size = [first], len(first.items)
        deadline = loop.time() + self.max_wait_s
        while size < self.max_batch and (left := deadline - loop.time()) > 0:
            try:
                pending = await asyncio.wait_for(self.queue.get(), left)
            except TimeoutError:
                break
            if pending.future.done():
                continue
            if pending.key != first.key or size + len(pending.items) > self.max_batch:
                carried = pending  # starts the next batch
                break
            batch.append(pending)
            size += len(pending.items)
        await self._batch(batch, first.key)
        return carried

    async def _batch(self, batch: list[_Pending], key: Any) -> None:
        items = [item for pending in batch for item in pending.items]
        if await self._call(batch, lambda: self.run(items, key), slices=True):
            return
        if len(batch) > 1:  # one bad input fails only its own request: the others again, one by one
            for pending in batch:
                if not pending.future.done():
                    await self._call([pending], lambda p=pending: self.run(p.items, key), slices=True)

    async def _call(self, batch: list[_Pending], fn: Callable[[], Any], slices=False, solo=False) -> bool:
        """Run `fn` in a thread and answer `batch`; False when it failed and the batch should be
        retried request by request (a single request gets the error)."""
        self.observe(1 if solo else sum(len(p.items) for p in batch))
        try:
            results = await asyncio.to_thread(fn)
        except Exception as e:
            if len(batch) > 1:
                return False
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return True
        start = 0
        for pending in batch:
            if not pending.future.done():  # a client that went away cancelled its future
                pending.future.set_result(results[start : start + len(pending.items)] if slices else results)
            start += len(pending.items)
        return True

    async def drain(self, worker: asyncio.Task, timeout_s: float) -> None:
        """Shutdown: refuse new requests, let the queued and running ones finish (at most
        `timeout_s`), then stop the worker."""
        self.closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self.busy or (self.queue is not None and not self.queue.empty())) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
