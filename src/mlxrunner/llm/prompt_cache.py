"""The prompt cache: key/value caches of earlier sequences, reused by a prompt that starts the same way.

Each entry is one whole sequence (a prompt and the tokens generated after it) with the caches of every layer
that hold it, as mlx-lm's server keeps them (`LRUPromptCache`). A new prompt takes the entry with the longest
common prefix; the generator then prefills only the rest. The prompt's last token is never taken from the cache:
it must run through the network to give the logits of the first new token. An entry the prompt extends (a chat's
next turn), or extends but for a short tail (at most HAND_OVER_TAIL positions past the shared prefix: the token
generated after a reply that the client did not send back, a reply's last tokens that the next prompt's template
writes otherwise), is handed over: it leaves the cache, is trimmed to the shared prefix, and MLX then writes the
follow-up into its buffers in place; the request's own sequence replaces it when it is done. Any other entry shared
only in part is copied (array handles: MLX arrays are immutable) and trimmed; the copy's first write into each
buffer copies that buffer, as a write into an array something else holds must (~0.8 ms of an H200 for 3,000 tokens
of a Qwen3-4B, growing with the context). mlx-lm's server pops a shorter cached sequence and deep-copies a longer
one; llama.cpp's server trims its slot's cache to the shared prefix and never copies. Here a long tail is worth
the copy (a conversation the user may branch back to), a short one is not: recomputing a few positions, should a
later prompt want them, costs less than copying the whole conversation's buffers at every such turn.

Entries are evicted least recently used first once their bytes pass the cap. A stored sequence that a new one
extends is dropped (the new one's cache, trimmed, serves it too), so one conversation holds one entry.

Why a list scanned in numpy and not a token trie: the cap holds few sequences (each is megabytes to gigabytes
of keys and values). Measured on the 2-core test VM (best of 5): comparing a 32k-token prompt with 64 stored
sequences of 32k tokens takes 3 ms; walking a Python dict trie along the same prompt takes 9 ms, and building
that trie for one 32k-token sequence 90 ms. All are small against the seconds of prefill a hit saves. Ollama's
trie also shares one copy of a common prefix between branches through snapshots; this cache keeps the whole
sequence per entry, which is simpler and enough for chat and agent loops, where a conversation extends (and so
replaces) its own entry.

The layer caches must offer what `_core.SequenceCache` offers (csrc/text/kv_cache.h): `length`, `can_trim(n)`,
`trim(n)` (False when a layer cannot forget positions, as a sliding window that has wrapped; in place, so a sequence
handed over stays free to be written in place), `nbytes`, `copy()`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger("mlxrunner")

# The most positions a stored sequence may hold past the prefix a prompt shares with it and still be handed over
# (trimmed, no copy) rather than copied; see the module's docstring.
HAND_OVER_TAIL = 32


class LayerCaches(Protocol):
    """One sequence's caches, a layer each (`_core.SequenceCache`)."""

    @property
    def length(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def can_trim(self, n: int) -> bool: ...

    def trim(self, n: int) -> bool: ...

    def copy(self) -> LayerCaches: ...


@dataclass
class _Entry:
    tokens: np.ndarray  # int32: the positions `caches` holds
    caches: LayerCaches
    nbytes: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PromptCache:
    """Sequences' caches up to `max_bytes` (0: nothing is kept). Use from one thread (the MLX worker), but for
    give_back."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._given_back: deque[tuple[Sequence[int], LayerCaches]] = deque()  # appended from any thread
        self.nbytes = 0

    def __len__(self) -> int:
        self._insert_given_back()
        return len(self._entries)

    def clear(self) -> None:
        """Drop every sequence."""
        self._given_back.clear()
        self._entries.clear()
        self.nbytes = 0

    def sequences(self) -> list[list[int]]:
        """The token sequences held, least recently used first."""
        self._insert_given_back()
        return [entry.tokens.tolist() for entry in self._entries.values()]

    def give_back(self, tokens: Sequence[int], caches: LayerCaches) -> None:
        """insert() from any thread: the sequence goes in at the owner thread's next call. (A stream its consumer
        drops is closed where it is dropped, perhaps by the garbage collector on another thread; the sequence it
        took from the cache must not be lost with it.)"""
        self._given_back.append((tokens, caches))

    def _insert_given_back(self) -> None:
        while self._given_back:
            self.insert(*self._given_back.popleft())

    def fetch(self, prompt: Sequence[int]) -> tuple[LayerCaches | None, int]:
        """Caches holding the longest prefix of `prompt` found (never its last token), and that prefix's
        length; (None, 0) when nothing matches. The caches are the caller's own: a stored sequence the prompt
        extends, but for at most HAND_OVER_TAIL positions, leaves the cache trimmed (the caller's finished sequence
        takes its place), any other is copied."""
        self._insert_given_back()
        ids = np.asarray(prompt, np.int32)
        usable = len(ids) - 1
        # The longest match first; among equals the entry that needs the least trimming.
        candidates = sorted(((min(common_prefix(e.tokens, ids), usable), -len(e.tokens), key)
                             for key, e in self._entries.items()), reverse=True)
        for reused, _, key in candidates:
            if reused == 0:
                break
            entry = self._entries[key]
            if len(entry.tokens) - reused <= HAND_OVER_TAIL and entry.caches.trim(len(entry.tokens) - reused):
                self._remove(key)
                return entry.caches, reused
            caches = entry.caches.copy()
            if caches.trim(caches.length - reused):
                self._entries.move_to_end(key)
                return caches, reused
        return None, 0

    def keep(self, tokens: Sequence[int], held: int, caches: LayerCaches) -> None:
        """Keep a finished sequence's caches, which hold its first `held` tokens (the prompt as far as the prefill
        got, then every token generated: the next turn of a chat starts with them)."""
        self.insert(tokens[:held], caches)

    def take_back(self, prompt: Sequence[int], caches: LayerCaches | None) -> None:
        """The caches fetch(prompt) gave a request that never started (its generator refused its arguments, as a
        token id outside the vocabulary, and left them whole): they go back, so a bad request does not lose the
        conversation a hand-over took out of the cache. Emptied caches (a generator took them) are not kept."""
        if caches is not None and caches.length:
            self.insert(prompt[: caches.length], caches)

    def insert(self, tokens: Sequence[int], caches: LayerCaches) -> None:
        """Keep `caches`, which hold exactly `tokens`, then evict down to the cap."""
        if caches.length != len(tokens):
            raise ValueError(f"the caches hold {caches.length} positions, not the {len(tokens)} tokens given")
        if self.max_bytes == 0 or not len(tokens):
            return
        self._insert_given_back()
        ids = np.asarray(tokens, np.int32)
        for key, entry in list(self._entries.items()):
            shared = common_prefix(entry.tokens, ids)
            if shared == len(ids) and entry.caches.can_trim(len(entry.tokens) - shared):
                self._entries.move_to_end(key)  # a stored sequence already covers this one
                return
            if shared == len(entry.tokens) and caches.can_trim(len(ids) - shared):
                self._remove(key)  # this one covers the stored one
        entry = _Entry(ids, caches, caches.nbytes)
        self._entries[ids.tobytes()] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        log.debug("prompt cache: dropped a sequence of %d tokens (%d bytes)", len(entry.tokens), entry.nbytes)
