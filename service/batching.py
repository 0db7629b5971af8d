"""Dynamic micro-batching on the one model thread (the pattern of Triton's dynamic batcher).

Requests are queued on the event loop. Whenever the model thread is free, the dispatcher takes every
job waiting, up to ``max_batch`` requests (a job is never split: a ``/recommend/batch`` call larger
than ``max_batch`` runs as one batch of its own), optionally waits ``wait_s`` for more to arrive, and
runs them as one call of ``run_batch`` on the thread. Under light load a request runs alone and pays
no wait; under load the queue fills while a batch runs, and the next batch takes it all at the cost
of one. Batching is a property of the server: callers submit single requests and get single answers.

``max_batch = 1`` is the unbatched server (one request per model call), kept for comparison.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Answer = TypeVar("Answer")

# What one request costs before any batch was measured: a guess of one millisecond.
INITIAL_REQUEST_SECONDS = 0.001
# Weight of the newest batch in the moving averages of the cost model.
COST_SMOOTHING = 0.1


@dataclass
class Job(Generic[Request, Answer]):
    """Requests submitted together; answered together, in their order."""

    requests: Sequence[Request]
    future: asyncio.Future[list[tuple[Answer | BaseException, float]]]
    enqueued: float = field(default_factory=time.perf_counter)


class BatchCost:
    """seconds(n) ≈ fixed + per_request · n for a model call of n requests, fitted to the batches seen
    (moving averages of n, seconds, n² and n·seconds: a least-squares line that follows the load).

    With batches all of one size the slope is undefined, and the cost is taken as proportional to n
    (no fixed part): an overestimate for larger batches, so the shedding it drives errs on the safe
    side until batches of other sizes have been seen."""

    def __init__(self, smoothing: float = COST_SMOOTHING) -> None:
        self.smoothing = smoothing
        # Before the first batch: one request, INITIAL_REQUEST_SECONDS (replaced by that batch).
        self.size, self.seconds = 1.0, INITIAL_REQUEST_SECONDS
        self.size_sq, self.size_seconds = 1.0, INITIAL_REQUEST_SECONDS
        self.observed = False

    def observe(self, size: int, seconds: float) -> None:
        w = self.smoothing if self.observed else 1.0
        self.observed = True
        self.size += w * (size - self.size)
        self.seconds += w * (seconds - self.seconds)
        self.size_sq += w * (size * size - self.size_sq)
        self.size_seconds += w * (size * seconds - self.size_seconds)

    def line(self) -> tuple[float, float]:
        """(fixed seconds, seconds per request), both >= 0."""
        variance = self.size_sq - self.size**2
        if variance > 1e-6 * max(self.size_sq, 1.0):
            slope = (self.size_seconds - self.size * self.seconds) / variance
            fixed = self.seconds - slope * self.size
            if slope >= 0 and fixed >= 0:
                return fixed, slope
        return 0.0, self.seconds / max(self.size, 1e-9)

    def batch_seconds(self, size: int) -> float:
        fixed, per_request = self.line()
        return fixed + per_request * size

    def wait_seconds(self, pending: int, max_batch: int) -> float:
        """Seconds until ``pending`` queued requests are computed, in batches of at most max_batch."""
        full, rest = divmod(pending, max_batch)
        return full * self.batch_seconds(max_batch) + (self.batch_seconds(rest) if rest else 0.0)


@dataclass(frozen=True)
class BatchStats:
    """What one model call did, for metrics: requests it answered and the seconds it took."""

    size: int
    seconds: float


class MicroBatcher(Generic[Request, Answer]):
    """Owns the queue and the one model thread; ``submit`` returns each request's outcome (its answer,
    or the exception computing it raised) and the seconds it waited in the queue.

    ``run_batch(requests)`` runs on the thread and returns one answer per request, in order. If it
    raises, each request of the batch is run alone, so that one bad request fails only itself.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Request]], list[Answer]],
        max_batch: int,
        wait_s: float = 0.0,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.on_batch = on_batch
        # Requests queued or running; changed on the event loop only, so no lock.
        self.pending = 0
        self.cost = BatchCost()
        # The model thread: one, so the model and the search are never run concurrently (GPU FAISS
        # requires it; on CPUs parallelism comes from the batch, not from threads fighting for cores).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coldwarm-model")
        self._queue: deque[Job[Request, Answer]] = deque()
        self._arrived: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    @property
    def expected_wait_s(self) -> float:
        """How long a request admitted now would wait: the batches ahead of it, at what batches of
        their sizes have cost lately."""
        return self.cost.wait_seconds(self.pending, self.max_batch)

    async def submit(self, requests: Sequence[Request]) -> list[tuple[Answer | BaseException, float]]:
        """(answer or exception, seconds queued) per request, in order."""
        if not requests:
            return []
        self._ensure_dispatcher()
        assert self._arrived is not None
        job: Job[Request, Answer] = Job(requests, asyncio.get_running_loop().create_future())
        self.pending += len(requests)
        self._queue.append(job)
        self._arrived.set()
        try:
            return await job.future
        finally:
            self.pending -= len(requests)

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _ensure_dispatcher(self) -> None:
        # Started lazily: the batcher is created before the event loop it serves runs (app start-up).
        if self._dispatcher is None or self._dispatcher.done():
            self._arrived = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch(), name="coldwarm-batcher"
            )

    async def _dispatch(self) -> None:
        assert self._arrived is not None
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.wait_s > 0 and self._queued_requests() < self.max_batch:
                await asyncio.sleep(self.wait_s)
            jobs = self._take_batch()
            if jobs:
                await self._run(jobs)

    def _queued_requests(self) -> int:
        return sum(len(job.requests) for job in self._queue)

    def _take_batch(self) -> list[Job[Request, Answer]]:
        jobs: list[Job[Request, Answer]] = []
        size = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # its caller went away (a cancelled request): nothing to compute
                self._queue.popleft()
                continue
            if jobs and size + len(job.requests) > self.max_batch:
                break
            jobs.append(self._queue.popleft())
            size += len(job.requests)
        return jobs

    async def _run(self, jobs: list[Job[Request, Answer]]) -> None:
        requests = [request for job in jobs for request in job.requests]
        loop = asyncio.get_running_loop()
        try:
            started, outcomes = await loop.run_in_executor(self.executor, self._answer_all, requests)
        except Exception as error:  # a lone request's own error, or a shut-down pool: its callers learn it
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        seconds = time.perf_counter() - started
        self.cost.observe(len(requests), seconds)
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(requests), seconds))
        offset = 0
        for job in jobs:
            mine = outcomes[offset : offset + len(job.requests)]
            offset += len(job.requests)
            if not job.future.done():
                job.future.set_result([(outcome, started - job.enqueued) for outcome in mine])

    def _answer_all(self, requests: Sequence[Request]) -> tuple[float, list[Answer | BaseException]]:
        """On the model thread: when it started (the end of the batch's queue wait), and the whole batch
        in one call, or, if that fails, each request alone."""
        return time.perf_counter(), self._outcomes(requests)

    def _outcomes(self, requests: Sequence[Request]) -> list[Answer | BaseException]:
        try:
            answers: list[Answer | BaseException] = list(self.run_batch(requests))
        except Exception:
            if len(requests) == 1:
                raise
            log.warning(
                "a batch of %d failed; answering its requests one by one", len(requests), exc_info=True
            )
            return [self._answer_one(request) for request in requests]
        if len(answers) != len(requests):
            raise RuntimeError(f"run_batch answered {len(answers)} of {len(requests)} requests")
        return answers

    def _answer_one(self, request: Request) -> Answer | BaseException:
        try:
            return self.run_batch([request])[0]
        except Exception as error:
            return error
