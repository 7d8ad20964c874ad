"""SIGINT/SIGTERM for the runner process: the first asks for a clean shutdown, any later one is logged.

The handlers go in before the server is imported and take over the signals that early_signals.py
recorded while the package (and MLX) loaded, so a signal in the first moments of start-up is a clean
exit 0 too, not death by the default handler with nothing on stderr. They are plain
`signal.signal` handlers, not the event loop's: the loop's are removed (and the default handler
restored) when `asyncio.run` closes it, which would leave a second signal during the last steps of
shutdown to kill the process.

Two safety nets go with them:
- While the event loop runs, a signal also writes a byte to a socket the loop watches
  (`signal.set_wakeup_fd`). Python runs a handler on the main thread at its next bytecode; if the
  kernel handed the signal to another thread (the worker, MLX's, the tokenizer's) while the main
  thread slept in the loop's poll, nothing would wake it to run the handler.
- The first signal arms a watchdog (`faulthandler.dump_traceback_later`, a C thread that needs no
  GIL): a shutdown still going SHUTDOWN_DEADLINE_S later, long past every wait it has, has wedged,
  and the watchdog writes every thread's stack to stderr and exits 1. A parent would SIGKILL it
  anyway; this way the log says where it stuck. `kill -USR1` writes the same stacks on demand.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import socket
import sys
from types import FrameType

from mlxrunner import early_signals

log = logging.getLogger("mlxrunner")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The longest a clean shutdown waits is the streams' grace (3 s), aiohttp's cleanup (2 s) and the
# worker's exit (1 s): far past that, it has wedged.
SHUTDOWN_DEADLINE_S = 20.0


class ShutdownSignals:
    """Counts SIGINT/SIGTERM; the first sets the `stop` event once the event loop has attached one."""

    def __init__(self) -> None:
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        if hasattr(signal, "SIGUSR1"):
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

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
        self._wake_loop_on_signals()
        if self.received:
            stop.set()

    def detach(self) -> None:
        """Called on the event loop before it closes: signals no longer write to its socket."""
        if self._wakeup is None:
            return
        signal.set_wakeup_fd(-1)
        reader, writer = self._wakeup
        self._loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()
        self._wakeup = None

    def _wake_loop_on_signals(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._loop.add_reader(reader.fileno(), _drain, reader)
        self._wakeup = (reader, writer)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received > 1:
            log.warning("received %s again: already shutting down, exiting as soon as that is done", name)
            return
        log.info("received %s: shutting down", name)
        faulthandler.dump_traceback_later(SHUTDOWN_DEADLINE_S, exit=True, file=sys.stderr)
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)


def _drain(reader: socket.socket) -> None:
    """The loop woke for a signal: its handler has run on the way here, so the bytes only need reading."""
    try:
        while reader.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def install() -> ShutdownSignals:
    signals = ShutdownSignals()
    signals.install()
    for signum in early_signals.take_received():
        signals._on_signal(signum, None)
    return signals
