"""Dynamic micro-batching: concurrent requests run through the model as one batch.

Like Triton's dynamic batcher, but opportunistic: a request that finds the model
idle and nobody else on the way runs at once (no added latency at concurrency
1); while a batch runs, new requests queue, and the next batch takes all of
them (up to ``max_batch`` examples). It waits ``max_delay_s`` at most, and
only for requests that are already being parsed, to fill a batch. Used only for
artifacts with a free batch dimension; one batch runs at a time per process,
and the runtime spreads it over its intra-op threads.
"""

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

Runner = Callable[[Any, np.ndarray], np.ndarray]


@dataclass
class _Item:
    model: Any
    x: np.ndarray
    future: asyncio.Future[np.ndarray] = field(repr=False)


class MicroBatcher:
    """Queue ``(model, x)`` pairs; a background task runs them in batches."""

    def __init__(self, run: Runner, max_batch: int = 64, max_delay_s: float = 0.002) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.arriving = 0  # requests being parsed now: worth waiting a little for
        self.batches = 0
        self.batched_examples = 0
        self._task: asyncio.Task[None] | None = None
        self._carry: _Item | None = None

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop batching; queued requests get an error."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))

    def running(self) -> bool:
        """Whether the batching task runs on this event loop (the app's lifespan started it)."""
        task = self._task
        if task is None or task.done():
            return False
        try:
            return task.get_loop() is asyncio.get_running_loop()
        except RuntimeError:
            return False

    @contextlib.contextmanager
    def arriving_request(self) -> Any:
        """Mark a request as on its way (parsing) so a forming batch may wait for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def submit(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Logits for ``x`` (N examples), computed in a batch with other requests."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Item(model, x, future))
        return await future

    async def _next(self) -> _Item:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return await self.queue.get()

    def _fits(self, first: _Item, item: _Item, size: int) -> bool:
        return (
            item.model is first.model
            and item.x.shape[1:] == first.x.shape[1:]
            and size + len(item.x) <= self.max_batch
        )

    async def _collect(self) -> list[_Item]:
        first = await self._next()
        batch, size = [first], len(first.x)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while size < self.max_batch:
            if self.queue.empty():
                # Wait only for requests already being parsed, and only briefly.
                remaining = deadline - loop.time()
                if self.arriving <= 0 or remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self.queue.get_nowait()
            if not self._fits(first, item, size):
                self._carry = item  # another model (a swap) or shape: the next batch
                break
            batch.append(item)
            size += len(item.x)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            live = [item for item in batch if not item.future.done()]  # clients gone
            if not live:
                continue
            x = live[0].x if len(live) == 1 else np.concatenate([i.x for i in live])
            try:
                logits = await run_in_threadpool(self.run, live[0].model, x)
            except Exception as e:  # handed to each waiting request, which answers it
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            self.batches += 1
            self.batched_examples += len(x)
            start = 0
            for item in live:
                n = len(item.x)
                if not item.future.done():
                    item.future.set_result(logits[start : start + n])
                start += n
