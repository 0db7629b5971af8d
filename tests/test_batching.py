"""The MicroBatcher on its own: what it packs into one model call, in which order, and what a failure
or a cancelled caller does to the others. ``run_batch`` here records the batches it is given."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from service.batching import BatchCost, BatchStats, MicroBatcher

BLOCKER = 1000  # the request that holds the model thread until the test frees it


class Recorder:
    """A run_batch that doubles each request and remembers every batch; it fails on negative requests
    and holds the thread on BLOCKER until ``free`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.free = threading.Event()

    def __call__(self, requests: Sequence[int]) -> list[int]:
        if BLOCKER in requests:
            self.free.wait(timeout=10)
        else:
            self.batches.append(list(requests))
        if any(r < 0 for r in requests):
            raise ValueError(f"negative request in {list(requests)}")
        return [2 * r for r in requests]


async def occupy(batcher: MicroBatcher[int, int]) -> asyncio.Task[list[int | BaseException]]:
    """A request that holds the model thread, so that the next ones queue behind it."""
    task = asyncio.create_task(answers(batcher, [BLOCKER]))
    await asyncio.sleep(0.02)
    return task


async def answers(batcher: MicroBatcher[int, int], requests: Sequence[int]) -> list[int | BaseException]:
    return [outcome for outcome, _ in await batcher.submit(requests)]


def test_requests_waiting_while_the_thread_is_busy_run_as_one_batch_in_order() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=8)
        blocker = await occupy(batcher)
        tasks = [asyncio.create_task(answers(batcher, [r])) for r in range(5)]
        await asyncio.sleep(0.05)
        assert batcher.pending == 6
        recorder.free.set()
        assert await blocker == [2 * BLOCKER]
        assert await asyncio.gather(*tasks) == [[0], [2], [4], [6], [8]]
        assert recorder.batches == [[0, 1, 2, 3, 4]]
        assert batcher.pending == 0
        batcher.close()

    asyncio.run(scenario())


def test_a_batch_holds_at_most_max_batch_requests_and_never_splits_a_job() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=3)
        await occupy(batcher)
        jobs = [[1], [2], [3, 4], [5, 6, 7, 8, 9], [10]]
        tasks = [asyncio.create_task(answers(batcher, job)) for job in jobs]
        await asyncio.sleep(0.05)
        recorder.free.set()
        results = await asyncio.gather(*tasks)
        assert results == [[2 * r for r in job] for job in jobs]
        # [1], [2] fit; [3, 4] would make 4 > 3 and waits; the 5-request job runs whole, alone.
        assert recorder.batches == [[1, 2], [3, 4], [5, 6, 7, 8, 9], [10]]
        batcher.close()

    asyncio.run(scenario())


def test_max_batch_one_is_the_unbatched_server() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=1)
        await occupy(batcher)
        tasks = [asyncio.create_task(answers(batcher, [r])) for r in range(4)]
        await asyncio.sleep(0.05)
        recorder.free.set()
        await asyncio.gather(*tasks)
        assert recorder.batches == [[0], [1], [2], [3]]
        batcher.close()

    asyncio.run(scenario())


def test_a_failing_request_fails_alone() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=8)
        await occupy(batcher)
        tasks = [asyncio.create_task(answers(batcher, job)) for job in ([1], [-1, 2], [3])]
        await asyncio.sleep(0.05)
        recorder.free.set()
        first, mixed, last = await asyncio.gather(*tasks)
        assert first == [2] and last == [6]
        assert isinstance(mixed[0], ValueError) and mixed[1] == 4
        # The whole batch once, then each request alone.
        assert recorder.batches == [[1, -1, 2, 3], [1], [-1], [2], [3]]
        batcher.close()

    asyncio.run(scenario())


def test_a_cancelled_request_is_not_computed_and_leaves_the_queue() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=8)
        await occupy(batcher)
        kept = asyncio.create_task(answers(batcher, [1]))
        gone = asyncio.create_task(answers(batcher, [2]))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.01)
        assert batcher.pending == 2  # the blocker and the one kept
        recorder.free.set()
        assert await kept == [2]
        assert recorder.batches == [[1]]
        batcher.close()

    asyncio.run(scenario())


def test_the_wait_gathers_requests_arriving_after_the_first() -> None:
    async def scenario(wait_s: float) -> list[list[int]]:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=8, wait_s=wait_s)
        first = asyncio.create_task(answers(batcher, [1]))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(answers(batcher, [2]))
        await asyncio.gather(first, second)
        batcher.close()
        return recorder.batches

    assert asyncio.run(scenario(0.0)) == [[1], [2]]
    assert asyncio.run(scenario(0.3)) == [[1, 2]]


def test_queue_wait_batch_stats_and_the_expected_wait() -> None:
    async def scenario() -> None:
        stats: list[BatchStats] = []
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch=2, on_batch=stats.append)
        await occupy(batcher)
        batcher.cost = proportional_cost(0.5)
        tasks = [asyncio.create_task(batcher.submit([r])) for r in range(3)]
        await asyncio.sleep(0.05)
        # The blocker and three waiting, two per batch of 0.5 s a request: two batches of 1 s each.
        assert batcher.expected_wait_s == pytest.approx(2.0)
        await asyncio.sleep(0.1)
        recorder.free.set()
        outcomes = await asyncio.gather(*tasks)
        waits = [waited for [(_, waited)] in outcomes]
        assert all(waited >= 0.14 for waited in waits), waits  # queued behind the blocked thread
        assert [s.size for s in stats] == [1, 2, 1]
        assert batcher.cost.seconds < 0.5  # moved towards the real cost
        batcher.close()

    asyncio.run(scenario())


def proportional_cost(per_request: float) -> BatchCost:
    """A cost model that has only seen batches of one request, each taking ``per_request`` seconds."""
    cost = BatchCost()
    cost.observe(1, per_request)
    return cost


def test_the_cost_model_fits_fixed_and_per_request_seconds() -> None:
    cost = BatchCost(smoothing=0.05)
    for _ in range(40):
        for size in (1, 3, 8, 20, 64, 256):
            cost.observe(size, 0.0005 + 0.0001 * size)
    fixed, per_request = cost.line()
    assert fixed == pytest.approx(0.0005, rel=1e-6) and per_request == pytest.approx(0.0001, rel=1e-6)
    # 130 waiting, 64 a batch: two full batches and one of 2.
    assert cost.wait_seconds(130, 64) == pytest.approx(2 * (0.0005 + 0.0064) + (0.0005 + 0.0002))
    # A 256-request job counts as the requests it holds, not as one batch of the usual size.
    assert cost.wait_seconds(256, 64) == pytest.approx(4 * (0.0005 + 0.0064))


def test_the_cost_of_one_batch_size_only_is_proportional() -> None:
    cost = BatchCost()
    for _ in range(50):
        cost.observe(4, 0.002)
    assert cost.line() == pytest.approx((0.0, 0.0005))
    assert cost.wait_seconds(10, 8) == pytest.approx(0.005)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="wait_s"):
        MicroBatcher(Recorder(), max_batch=4, wait_s=-1.0)
