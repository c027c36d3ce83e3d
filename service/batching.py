"""Dynamic micro-batching of predictions: one forward pass for the images of concurrent requests.

A request's images are decoded and turned into TTA views in the threadpool (``Predictor.views``);
``MicroBatcher.predict_proba`` then queues those views under the request's (loaded model, TTA mode).
One dedicated inference thread runs the forward passes, one batch at a time. When it is free, the
queue whose oldest request has waited longest is taken once it holds ``max_batch`` images or that
request has waited ``max_wait_ms``: up to ``max_batch`` images of its requests are concatenated,
run through ``Predictor.predict_proba_views`` once, and the probabilities are split back per request.
While the thread is busy, new requests pile up, so the batches grow with the load by themselves.

Everything but the forward pass runs on the event loop, which never blocks; torch is imported
only on the inference thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from service.errors import ServiceError, Unavailable
from service.metrics import PREDICT_BATCH_IMAGES, PREDICT_BATCH_SECONDS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from models.artifact import Predictor

log = logging.getLogger("zoofit.batching")

# call_at may run a timer up to the clock's resolution early: a deadline that close counts as reached.
_CLOCK_SLACK = time.get_clock_info("monotonic").resolution


class InferenceFailed(ServiceError):
    """The forward pass of a batch raised: each request of that batch, and only those, gets this error."""

    status = 500


@dataclass(eq=False)
class _Item:
    """A request's images (or one chunk of at most ``max_batch`` of them) waiting for a forward pass."""

    views: list[torch.Tensor]
    size: int
    since: float  # loop time when queued
    future: asyncio.Future[np.ndarray]


_Key = tuple["Predictor", str]


def _start_inference_thread(threads: int | None) -> None:
    import torch

    from models.runtime import available_cpus

    n = threads or available_cpus()
    torch.set_num_threads(n)
    log.info("inference thread started with %d torch intra-op thread(s)", n)


def _forward(predictor: Predictor, parts: list[list[torch.Tensor]]) -> np.ndarray:
    """Probabilities of the requests' views, concatenated, in one ``predict_proba_views`` call."""
    if len(parts) == 1:
        return predictor.predict_proba_views(parts[0])
    import torch

    return predictor.predict_proba_views([torch.cat([p[v] for p in parts]) for v in range(len(parts[0]))])


def _timed_forward(predictor: Predictor, parts: list[list[torch.Tensor]]) -> np.ndarray:
    with PREDICT_BATCH_SECONDS.time():  # failed passes too: a slow failure is slow
        return _forward(predictor, parts)


def _failure(exc: BaseException | None, images: int) -> ServiceError:
    """The error a request of a failed batch of ``images`` images gets (a new one per request)."""
    if exc is None:
        return Unavailable("the forward pass was cancelled; try again")
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return Unavailable(f"not enough memory to run a batch of {images} image(s); try again or send fewer")
    error = InferenceFailed(f"prediction failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class MicroBatcher:
    """Runs the forward passes of concurrent predict requests together, on one inference thread.

    Requests for different models or TTA modes never share a batch (the views differ); requests
    with more than ``max_batch`` images are split into chunks of at most ``max_batch``, so no
    forward pass exceeds it. A forward pass that raises fails the requests of that batch only.

    One batcher serves one event loop at a time (a later loop takes it over once the previous one
    has stopped, as successive test clients do). ``aclose`` drains it on shutdown.

    Args:
        max_batch: most images in one forward pass; 1 runs every image alone.
        max_wait_ms: longest time a request waits for others to fill its batch, once the inference
            thread is free; 0 runs what is queued at once.
        threads: torch intra-op threads of the inference thread; ``None``: all usable cores.
    """

    def __init__(self, max_batch: int, max_wait_ms: float, threads: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not (math.isfinite(max_wait_ms) and max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.threads = threads
        self._queues: dict[_Key, deque[_Item]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: asyncio.Future[np.ndarray] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._draining = False

    async def predict_proba(self, predictor: Predictor, views: list[torch.Tensor], tta: str) -> np.ndarray:
        """Temperature-scaled probabilities of one request's images, computed in a shared batch.

        Args:
            predictor: the loaded model.
            views: ``predictor.views(images, tta)``: one ``uint8 [N, S, S, 3]`` tensor per view.
            tta: the TTA mode the views were made with; only requests with the same one are batched together.

        Returns:
            ``float32 [N, C]``, equal (up to float rounding) to ``predictor.predict_proba(images, tta)``.

        Raises:
            InferenceFailed: the forward pass of the batch raised (HTTP 500).
            Unavailable: the batch ran out of memory or was cancelled (HTTP 503).
            ValueError: views of different shapes, or unlike those queued for the same model and
                ``tta`` (checked here, so that a wrong request cannot fail the batch it would join).
        """
        loop = asyncio.get_running_loop()
        self._bind(loop)
        n = len(views[0]) if views else 0
        if n == 0:
            return predictor.predict_proba_views(views)  # raises on no views; zeros otherwise
        if any(v.shape != views[0].shape for v in views):
            raise ValueError(f"the views of one request must have one shape, got {[list(v.shape) for v in views]}")
        queue = self._queues.setdefault((predictor, tta), deque())
        if queue and (len(queue[0].views) != len(views) or queue[0].views[0].shape[1:] != views[0].shape[1:]):
            raise ValueError(f"{len(views)} view(s) of {list(views[0].shape[1:])} do not match the "
                             f"{len(queue[0].views)} of {list(queue[0].views[0].shape[1:])} queued for tta={tta!r}")
        now = loop.time()
        futures: list[asyncio.Future[np.ndarray]] = []
        for start in range(0, n, self.max_batch):
            chunk = [v[start : start + self.max_batch] for v in views]
            futures.append(loop.create_future())
            queue.append(_Item(chunk, len(chunk[0]), now, futures[-1]))
        self._pump()
        # Wait for every chunk even when one fails, so no error is left unretrieved.
        results = await asyncio.gather(*futures, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        if len(results) == 1:
            return results[0]  # type: ignore[return-value]
        import numpy as np

        return np.concatenate(results)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        """Run what is queued without waiting, let the last batch finish, then stop the inference thread.

        A request made afterwards starts a new inference thread (an app whose lifespan runs again).
        """
        self._bind(asyncio.get_running_loop())
        self._draining = True
        try:
            while True:
                self._pump()
                if self._running is None:
                    break
                await asyncio.wait([self._running])
        finally:
            self._draining = False
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None and self._loop.is_running():
            raise RuntimeError("this MicroBatcher already serves another running event loop")
        # The previous loop has stopped: what it left queued or running can never complete there.
        self._loop = loop
        self._queues.clear()
        self._running = None
        self._timer = None

    def _pump(self) -> None:
        """Start the next batch if the inference thread is free and a queue is ready; else arm the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running is not None:
            return  # _finish pumps again
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        ready: _Key | None = None
        ready_since = next_deadline = math.inf
        for key, queue in list(self._queues.items()):
            while queue and queue[0].future.done():  # requests cancelled while they waited
                queue.popleft()
            if not queue:
                del self._queues[key]
                continue
            since = queue[0].since
            deadline = since + self.max_wait_s
            full = sum(item.size for item in queue if not item.future.done()) >= self.max_batch
            if full or self._draining or deadline <= now + _CLOCK_SLACK:
                if since < ready_since:
                    ready, ready_since = key, since
            else:
                next_deadline = min(next_deadline, deadline)
        if ready is not None:
            self._start(loop, ready)
        elif next_deadline < math.inf:
            self._timer = loop.call_at(next_deadline, self._pump)

    def _start(self, loop: asyncio.AbstractEventLoop, key: _Key) -> None:
        queue = self._queues[key]
        batch: list[_Item] = []
        size = 0
        while queue:
            item = queue[0]
            if item.future.done():
                queue.popleft()
                continue
            if batch and size + item.size > self.max_batch:
                break
            batch.append(queue.popleft())
            size += item.size
        if not queue:
            del self._queues[key]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix="zoofit-inference",
                initializer=_start_inference_thread, initargs=(self.threads,),
            )
        PREDICT_BATCH_IMAGES.observe(size)
        try:
            running = loop.run_in_executor(self._executor, _timed_forward, key[0], [item.views for item in batch])
        except Exception as exc:  # a broken executor (its initializer raised): try a new one next time
            self._executor = None
            log.error("cannot start a forward pass of %d image(s)", size, exc_info=exc)
            for item in batch:
                item.future.set_exception(_failure(exc, size))
            loop.call_soon(self._pump)
            return
        self._running = running
        running.add_done_callback(partial(self._finish, batch, size))

    def _finish(self, batch: list[_Item], size: int, running: asyncio.Future[np.ndarray]) -> None:
        if running is self._running:
            self._running = None
        try:
            error = None if running.cancelled() else running.exception()
            if running.cancelled() or error is not None:
                log.error("forward pass of %d image(s) failed", size, exc_info=error)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(_failure(error, size))
                return
            probs = running.result()
            start = 0
            for item in batch:
                if not item.future.done():  # the request may have been cancelled meanwhile
                    item.future.set_result(probs[start : start + item.size])
                start += item.size
        finally:
            self._pump()
