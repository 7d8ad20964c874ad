"""CPU work that does not touch MLX (tokenizing, detokenizing), run off the event loop.

A 40 MB text takes the tokenizer most of a minute. On the event loop that would freeze /health;
on the MLX worker it would hold up every other job, with no step at which to cancel it. So it runs
on a daemon thread of its own: the handler awaits it, and a client that goes away abandons it (the
thread finishes, its result is dropped, and it never keeps the process from exiting). At most
`max_threads` run at once, counting abandoned ones, so hostile clients cannot pile up threads.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


class OffLoop:
    def __init__(self, max_threads: int = 2):
        self.max_threads = max_threads
        self._slots: asyncio.Semaphore | None = None  # made on the event loop, at first use

    async def run(self, name: str, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_threads)
        slots = self._slots
        await slots.acquire()
        outcome: asyncio.Future = loop.create_future()

        def finish(result: T | None, error: BaseException | None) -> None:
            slots.release()  # the thread has ended, whether or not anyone still waits for it
            if outcome.done():
                return
            if error is not None:
                outcome.set_exception(error)
            else:
                outcome.set_result(result)

        def work() -> None:
            result, error = None, None
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting handler
                error = exc
            try:
                loop.call_soon_threadsafe(finish, result, error)
            except RuntimeError:
                pass  # the event loop has closed: the runner is exiting

        threading.Thread(target=work, name=name, daemon=True).start()
        return await outcome
