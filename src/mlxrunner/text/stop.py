"""Stop strings over streamed text (docs/models/llm.md, as Ollama's runner/common/stop.go).

Text arrives in pieces (already valid UTF-8, from the detokenizer), and a stop string may be split
across pieces. The matcher therefore holds back the end of the text while it could still be the
beginning of a stop string, and sends everything else at once. When a stop string completes, the
text before it is sent and the stop string and everything after it are dropped.

The match is decided as soon as any stop string is complete: generation stops there, so "the
text" is what has arrived so far, and the stop reported is the one occurring earliest in it (the
longest at equal positions). A longer stop that began earlier but is still incomplete does not
delay this: with stops "abcd" and "bc", the text "abc" stops at "bc" and sends "a".

With no stop strings nothing is ever held back.
"""

from __future__ import annotations


class StopMatcher:
    """Finds the first stop string in one response's text, streamed piece by piece."""

    def __init__(self, stops: list[str]):
        # An empty stop string would match everywhere; the request parser refuses it, and here it is
        # simply ignored.
        self._stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self._longest = len(self._stops[0]) if self._stops else 0
        self._pending = ""  # received, not yet sent: could be the start of a stop string
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def push(self, text: str) -> tuple[str, str | None]:
        """Take the next piece; return (text safe to send now, the stop string that matched or None).

        After a match the stream is over: later pieces are dropped and the match is reported again.
        """
        if self.matched is not None:
            return "", self.matched
        if not self._stops:
            return text, None
        pending = self._pending + text
        match = self._first_match(pending)
        if match is not None:
            position, stop = match
            self._pending, self.matched = "", stop
            return pending[:position], stop
        held = self._partial_match_length(pending)
        self._pending = pending[len(pending) - held:] if held else ""
        return pending[:len(pending) - held], None

    def flush(self) -> str:
        """End of stream without a match: the held-back text, which turned out not to be a stop."""
        held, self._pending = self._pending, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(position, stop) of the earliest stop string in `text`; at equal positions the longest."""
        best: tuple[int, str] | None = None
        for stop in self._stops:  # longest first, so a later stop replaces it only if strictly earlier
            position = text.find(stop)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        return best

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of some stop string."""
        for length in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-length:]
            if any(len(stop) > length and stop.startswith(tail) for stop in self._stops):
                return length
        return 0
