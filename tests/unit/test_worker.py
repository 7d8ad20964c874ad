"""worker.py: one thread, jobs in order, bounded queue, cancellation queued or running."""

import asyncio
import threading
import time

import pytest

from mlxrunner.errors import Cancelled
from mlxrunner.worker import QueueFull, Worker, WorkerStopped


def run(coro):
    return asyncio.run(coro)


def test_jobs_run_in_order_on_one_thread():
    async def main():
        worker = Worker()
        threads, order = set(), []

        def job(i):
            def fn(ctx):
                threads.add(threading.get_ident())
                order.append(i)
                return i * 10
            return fn

        jobs = [worker.submit(f"j{i}", job(i)) for i in range(5)]
        results = [await j.wait() for j in jobs]
        worker.stop()
        return results, order, threads

    results, order, threads = run(main())
    assert results == [0, 10, 20, 30, 40] and order == [0, 1, 2, 3, 4]
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_events_stream_back_and_errors_are_raised_to_the_caller():
    async def main():
        worker = Worker()

        def fn(ctx):
            for i in range(3):
                ctx.emit({"step": i})
            raise ValueError("bad step")

        job = worker.submit("events", fn)
        events = [e async for e in job.events()]
        worker.stop()
        return events, job

    events, job = run(main())
    assert events == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert isinstance(job.error, ValueError) and str(job.error) == "bad step"


def test_cancel_running_job_stops_it_at_its_next_check():
    async def main():
        worker = Worker()
        steps = []
        started = threading.Event()

        def fn(ctx):
            for i in range(1000):
                started.set()
                ctx.check_cancelled()
                steps.append(i)
                time.sleep(0.005)
            return "finished"

        job = worker.submit("long", fn)
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        await asyncio.sleep(0.05)
        job.cancel("client disconnected")
        with pytest.raises(Cancelled, match="client disconnected"):
            await job.wait()
        after = len(steps)
        await asyncio.sleep(0.05)
        worker.stop()
        return after, len(steps)

    after, later = run(main())
    assert 0 < after < 1000 and later == after  # it stopped and stayed stopped


def test_cancelled_queued_job_never_starts():
    async def main():
        worker = Worker()
        gate = threading.Event()
        ran = []
        blocker = worker.submit("blocker", lambda ctx: gate.wait(5))
        queued = worker.submit("queued", lambda ctx: ran.append("queued"))
        queued.cancel("client disconnected")
        gate.set()
        await blocker.wait()
        with pytest.raises(Cancelled):
            await queued.wait()
        worker.stop()
        return ran

    assert run(main()) == []


def test_queue_is_bounded_and_stop_refuses_new_jobs():
    async def main():
        worker = Worker(max_queued=2)
        gate = threading.Event()
        worker.submit("running", lambda ctx: gate.wait(5))
        await asyncio.sleep(0.05)  # let it start: the running job does not count as queued
        waiting = [worker.submit(f"q{i}", lambda ctx: None) for i in range(2)]
        with pytest.raises(QueueFull, match="queue is full"):
            worker.submit("one too many", lambda ctx: None)
        worker.stop()
        gate.set()
        for job in waiting:
            with pytest.raises(Cancelled):
                await job.wait()
        with pytest.raises(WorkerStopped):
            worker.submit("late", lambda ctx: None)
        assert worker.join(2)

    run(main())


def test_the_idle_callback_runs_once_per_idle_spell_on_the_worker_thread():
    async def main():
        calls, job_threads = [], []
        worker = Worker(on_idle=lambda: calls.append(threading.get_ident()), idle_after_s=0.3)
        await asyncio.sleep(0.5)
        before_any_job = list(calls)  # nothing ran yet: nothing to give back
        for i in range(4):  # jobs 0.1 s apart: never idle for 0.3 s in between
            await worker.submit(f"j{i}", lambda ctx: job_threads.append(threading.get_ident())).wait()
            await asyncio.sleep(0.1)
        during = list(calls)
        await asyncio.sleep(1.0)  # one idle spell, three timeouts long
        after = list(calls)
        await worker.submit("again", lambda ctx: None).wait()
        await asyncio.sleep(0.6)
        worker.stop()
        return before_any_job, during, after, list(calls), job_threads

    before_any_job, during, after, final, job_threads = run(main())
    assert before_any_job == [] and during == []
    assert after == [job_threads[0]]  # once, on the worker's own thread (where MLX work runs)
    assert len(final) == 2


def test_a_failing_idle_callback_does_not_stop_the_worker():
    def boom():
        raise RuntimeError("release failed")

    async def main():
        worker = Worker(on_idle=boom, idle_after_s=0.05)
        first = await worker.submit("a", lambda ctx: 1).wait()
        await asyncio.sleep(0.3)
        second = await worker.submit("b", lambda ctx: 2).wait()
        worker.stop()
        return first, second

    assert run(main()) == (1, 2)


class CountingBatch:
    """A Batch whose members each wait for `steps` steps of the worker's thread (as a decode does for its tokens),
    recording which jobs were live at each step and on which thread the steps ran."""

    def __init__(self, max_jobs: int, steps: int):
        self.max_jobs = max_jobs
        self.steps = steps
        self._cond = threading.Condition()
        self._step = 0
        self.live: list[set[str]] = []
        self.members: set[str] = set()
        self.step_threads: set[int] = set()

    def serve(self, job):
        job()

    def wait_steps(self, name: str) -> None:
        with self._cond:
            self.members.add(name)
            end = self._step + self.steps
            while self._step < end:
                self._cond.wait()
            self.members.discard(name)

    def step(self) -> None:
        self.step_threads.add(threading.get_ident())
        with self._cond:
            self.live.append(set(self.members))
            self._step += 1
            self._cond.notify_all()
        time.sleep(0.001)

    def wake(self) -> None:
        pass


def test_batch_jobs_run_side_by_side_and_other_jobs_wait_for_the_batch():
    async def main():
        worker = Worker()
        batch = CountingBatch(max_jobs=2, steps=20)
        order = []

        def member(name):
            def fn(ctx):
                order.append(("start", name))
                batch.wait_steps(name)
                order.append(("end", name))
                return name
            return fn

        def alone(ctx):
            order.append(("alone", threading.get_ident()))
            return "alone"

        jobs = [worker.submit("a", member("a"), batch=batch), worker.submit("b", member("b"), batch=batch),
                worker.submit("c", member("c"), batch=batch), worker.submit("alone", alone),
                worker.submit("d", member("d"), batch=batch)]
        results = [await j.wait() for j in jobs]
        worker.stop()
        return results, order, batch

    results, order, batch = run(main())
    assert results == ["a", "b", "c", "alone", "d"]
    assert max(len(live) for live in batch.live) == 2 and {"a", "b"} in batch.live
    assert len(batch.step_threads) == 1  # every step on the worker's one thread
    starts = [name for kind, name in order if kind == "start"]
    assert starts == ["a", "b", "c", "d"]
    # c joined once a or b had left; b joined while a was still decoding.
    position = {entry: i for i, entry in enumerate(order)}
    assert position[("start", "c")] > min(position[("end", "a")], position[("end", "b")])
    assert position[("start", "b")] < position[("end", "a")]
    # The other job ran after the batch of a, b, c drained, and d (queued after it) did not overtake it.
    alone_at, alone_thread = next((i, ident) for i, (kind, ident) in enumerate(order) if kind == "alone")
    assert {alone_thread} == batch.step_threads
    assert alone_at > max(position[("end", n)] for n in "abc") and alone_at < position[("start", "d")]
