"""Dynamic batching for `serve`: concurrent requests answered by one model call.

Requests go onto an asyncio queue; one worker takes the first, collects what else arrives within
`max_wait_ms` (up to `max_batch` items, and only requests with the same `key`: generation settings
must match to share a `generate` call), runs `run(items, key)` in a worker thread so the event
loop keeps accepting requests, and answers each request from its slice of the results. A request
that does not fit the batch starts the next one. The model sees one call at a time.

Written by hand: FastAPI/Starlette have no request batching, and the serving frameworks that do
(Triton, Ray Serve, TorchServe) would each be a server of their own in front of this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
    ):
        self.run, self.max_batch, self.max_wait_s, self.observe = run, max_batch, max_wait_ms / 1000, observe
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()

    async def submit(self, items: list, key: Any = None) -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(items, key, future))
        return await future

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        carried: _Pending | None = None
        while True:
            first = carried or await self.queue.get()
            carried, batch, size = None, [first], len(first.items)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    pending = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
                if pending.key != first.key or size + len(pending.items) > self.max_batch:
                    carried = pending  # starts the next batch
                    break
                batch.append(pending)
                size += len(pending.items)
            items = [item for pending in batch for item in pending.items]
            self.observe(len(items))
            try:
                results = await asyncio.to_thread(self.run, items, first.key)
            except Exception as e:  # every request of the batch gets the error
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(e)
                continue
            start = 0
            for pending in batch:
                if not pending.future.done():  # a client that went away cancelled its future
                    pending.future.set_result(results[start : start + len(pending.items)])
                start += len(pending.items)
