"""SIGINT/SIGTERM for the runner process: the first asks for a clean shutdown, any later one is logged.

The handlers go in before the server is imported and take over the signals that early_signals.py
recorded while the package (and MLX) loaded, so a signal in the first moments of start-up is a clean
exit 0 too, not death by the default handler with nothing on stderr. They are plain
`signal.signal` handlers, not the event loop's: the loop's are removed (and the default handler
restored) when `asyncio.run` closes it, which would leave a second signal during the last steps of
shutdown to kill the process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

from mlxrunner import early_signals

log = logging.getLogger("mlxrunner")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ShutdownSignals:
    """Counts SIGINT/SIGTERM; the first sets the `stop` event once the event loop has attached one."""

    def __init__(self) -> None:
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def ignore_from_now(self) -> None:
        """Shutdown is done but for the exit: ignore further signals in the kernel. Python's
        finalization puts the default handlers back, and a late second signal would then kill the
        process instead of letting it exit 0."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def attach(self, stop: asyncio.Event) -> None:
        """Called on the running event loop: signals now set `stop` (at once if one already came)."""
        self._loop = asyncio.get_running_loop()
        self._stop = stop
        if self.received:
            stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received > 1:
            log.warning("received %s again: already shutting down, exiting as soon as that is done", name)
            return
        log.info("received %s: shutting down", name)
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)


def install() -> ShutdownSignals:
    signals = ShutdownSignals()
    signals.install()
    for signum in early_signals.take_received():
        signals._on_signal(signum, None)
    return signals
