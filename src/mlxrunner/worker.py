"""The one thread that owns all MLX work.

MLX streams and its caches are not meant to be driven from several threads at once, and a model
runner does one job at a time anyway (Ollama's runner serialised requests with a mutex plus one
MLX thread). So every piece of MLX work, model loading included, is a `Job` run by a single
`Worker` thread, in order. aiohttp handlers only submit jobs and await their events.

A job's function receives a `JobContext`: it calls `ctx.check_cancelled()` between steps (tokens,
denoising steps, batches) and `ctx.emit(event)` to stream progress back to the asyncio side.
Cancelling a queued job takes it out of the queue at once (its slot is free for the next request)
and ends it with `errors.Cancelled`; cancelling a running job stops it at its next check, where
`errors.Cancelled` unwinds it.

The one exception to "in order": jobs submitted with a `Batch` (an LLM's text generations, llm/batch.py) run
side by side, up to `batch.max_jobs`, each on a thread of its own, while the worker's thread does the MLX work
they all share (`batch.step()`). A job that arrives while a batch runs joins it at the next step; a job of
another kind waits until the batch has drained, and no batch job overtakes it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from typing import Any, AsyncIterator, Callable, Protocol

from mlxrunner.errors import Cancelled

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker already holds as many queued jobs as it may."""


class WorkerStopped(Exception):
    """The worker is shutting down and takes no more jobs."""


_END = object()  # marks the end of a job's event stream


class Batch(Protocol):
    """Work that several jobs share on the worker's thread (llm/batch.py's BatchScheduler)."""

    max_jobs: int  # jobs running side by side at most

    def serve(self, job: Callable[[], None]) -> None:
        """Run a job on the calling thread (one of its own) as a member of the batch."""

    def step(self) -> None:
        """On the worker's thread: one step of the members' MLX work, or a short wait for some."""

    def wake(self) -> None:
        """Cut a waiting step() short (a job has been queued)."""


class JobContext:
    """What a running job sees: its cancel flag and a way to send events back."""

    def __init__(self, job: Job):
        self._job = job

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self._job.cancel_event.is_set():
            raise Cancelled(self._job.cancel_reason)

    def emit(self, event: Any) -> None:
        self._job.post(event)


class Job:
    """One unit of MLX work plus the stream of events it produces for one awaiting caller."""

    def __init__(self, job_id: int, name: str, fn: Callable[[JobContext], Any], loop: asyncio.AbstractEventLoop,
                 batch: Batch | None = None):
        self.id = job_id
        self.batch = batch
        self.name = name
        self._fn = fn
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancel_event = threading.Event()
        self.cancel_reason = "cancelled"
        self.started = False
        self.result: Any = None
        self.error: BaseException | None = None
        # Set by the worker that queues the job: takes it out of the queue, True if it was still there.
        self.withdraw: Callable[[Job], bool] | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        if self.cancel_event.is_set():
            return
        self.cancel_reason = reason
        self.cancel_event.set()
        if self.withdraw is not None and self.withdraw(self):  # never started: it ends here, not in the worker
            log.info("job %d (%s) cancelled: %s", self.id, self.name, reason)
            self.error = Cancelled(reason)
            self.post(_END)

    def post(self, event: Any) -> None:
        """Thread-safe: queue an event for the asyncio side."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more

    def run(self) -> None:
        self.started = True
        try:
            if self.cancel_event.is_set():
                raise Cancelled(self.cancel_reason)
            self.result = self._fn(JobContext(self))
        except BaseException as exc:  # reported to the awaiting caller, never lost in the thread
            self.error = exc
        self.post(_END)

    async def events(self) -> AsyncIterator[Any]:
        """Yield the job's events as they come; afterwards `result` or `error` is set."""
        while True:
            event = await self._events.get()
            if event is _END:
                return
            yield event

    async def wait(self) -> Any:
        """Wait for the end, dropping events; return the result or raise the job's error."""
        async for _ in self.events():
            pass
        if self.error is not None:
            raise self.error
        return self.result


class Worker:
    """A single thread running submitted jobs in order, with a bounded queue.

    `on_idle`, if given, runs on the worker thread once the queue has stayed empty for `idle_after_s`
    after a job: the runner gives MLX's buffer cache back there. Keeping the cache while requests
    keep coming saves each 1024² image 15-35 ms on an H200 (releasing it at the end of every image
    cost the Klein rows 1.35x -> 1.20x against diffusers; benchmarks/README.md), and an idle runner
    still holds no more than its weights."""

    def __init__(self, max_queued: int = 16, name: str = "mlx-worker", *,
                 on_idle: Callable[[], None] | None = None, idle_after_s: float = 1.0):
        self.max_queued = max_queued
        self.on_idle = on_idle
        self.idle_after_s = idle_after_s
        self._worked_since_idle = False
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._running: list[Job] = []
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> list[Job]:
        """The jobs running now: one, or the members of a batch."""
        with self._cond:
            return list(self._running)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, name: str, fn: Callable[[JobContext], Any], *, loop: asyncio.AbstractEventLoop | None = None,
               bypass_limit: bool = False, batch: Batch | None = None) -> Job:
        """Queue `fn` to run on the worker thread (or, with a batch, beside the batch's other jobs). Raises
        QueueFull or WorkerStopped."""
        job = Job(next(self._ids), name, fn, loop or asyncio.get_running_loop(), batch)
        with self._cond:
            if self._stopping:
                raise WorkerStopped("the runner is shutting down")
            if not bypass_limit and len(self._queue) >= self.max_queued:
                raise QueueFull(f"the request queue is full ({self.max_queued} jobs waiting); try again later")
            self._queue.append(job)
            job.withdraw = self._withdraw
            self._cond.notify()
        if batch is not None:
            batch.wake()
        log.debug("job %d (%s) queued, %d waiting", job.id, name, len(self._queue))
        return job

    def stop(self, reason: str = "the runner is shutting down") -> None:
        """Take no more jobs; cancel the queued ones and the running one at its next check."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            running = list(self._running)
            self._cond.notify_all()
        for job in pending:
            job.cancel(reason)
        for job in running:
            job.cancel(reason)

    def _withdraw(self, job: Job) -> bool:
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                return True
            return False

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._queue and not self._stopping:
                if not (self._worked_since_idle and self.on_idle):
                    self._cond.wait()
                elif not self._cond.wait(self.idle_after_s) and not self._queue and not self._stopping:
                    self._worked_since_idle = False
                    self._go_idle()
            if self._queue:
                self._running = [self._queue.popleft()]
                self._worked_since_idle = True
                return self._running[0]
            return None

    def _go_idle(self) -> None:
        """on_idle, with the lock released so that submit() never waits for it."""
        self._cond.release()
        try:
            self.on_idle()
        except Exception:  # noqa: BLE001 - a failed release must not stop the worker
            log.warning("the idle callback failed", exc_info=True)
        finally:
            self._cond.acquire()

    def _loop(self) -> None:
        while (job := self._next_job()) is not None:
            if job.batch is None:
                self._run(job)
            else:
                self._run_batch(job)
            with self._cond:
                self._running = []

    def _run(self, job: Job) -> None:
        job.run()
        if isinstance(job.error, Cancelled):
            log.info("job %d (%s) cancelled: %s", job.id, job.name, job.error)
        elif job.error is not None:
            log.debug("job %d (%s) failed: %r", job.id, job.name, job.error)

    def _run_batch(self, first: Job) -> None:
        """Run `first` and the batch jobs queued behind it side by side, each on a thread of its own, stepping
        their batch here until every one has ended."""
        batch = first.batch
        threads: dict[Job, threading.Thread] = {}

        def start(job: Job) -> None:
            threads[job] = threading.Thread(target=batch.serve, args=(lambda: self._run(job),),
                                            name=f"{self._thread.name}-job-{job.id}", daemon=True)
            threads[job].start()

        start(first)
        while True:
            with self._cond:
                for job in [j for j, thread in threads.items() if not thread.is_alive()]:
                    del threads[job]
                while (self._queue and self._queue[0].batch is batch and len(threads) < batch.max_jobs
                       and not self._stopping):
                    job = self._queue.popleft()
                    start(job)
                self._running = list(threads)
            if not threads:
                return
            try:
                batch.step()
            except Exception:  # noqa: BLE001 - the batch answers its jobs' errors; this thread must go on
                log.exception("a batch step failed")
