"""The prompt embeddings of an image pipeline's last few prompts, kept for reuse.

Trying seeds, sizes, step counts or guidance for one prompt is how an image is usually found; none of those changes
what the text encoder makes of the prompt. A request whose templated prompt (its token ids, after truncation) was
encoded recently takes the kept embedding instead of running the text encoder again, as a node-graph tool re-runs
only the nodes whose inputs changed. The embedding is the same array the encoder made, so the image is the same bits.
Under `--low-memory` (or with the text encoder released after each prompt) a reused embedding also spares reading the
text encoder's weights again. Each embedding is small beside the networks: at most 512 tokens of Z-Image's 2,560
bfloat16 features (2.6 MB), FLUX.2 Klein's 512 x 7,680 (7.9 MB).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import mlx.core as mx

# How many prompts' embeddings a pipeline keeps (least recently used dropped first): a negative prompt counts as one.
PROMPT_EMBEDDINGS_KEPT = 8


class PromptEmbeddings:
    """Embeddings by the token ids they were made from, the last `kept` used; `hits` and `misses` count lookups."""

    def __init__(self, kept: int = PROMPT_EMBEDDINGS_KEPT):
        self.kept = kept
        self.hits = 0
        self.misses = 0
        self._by_ids: OrderedDict[tuple[int, ...], mx.array] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_ids)

    def get_or_make(self, ids: Sequence[int], make: Callable[[list[int]], mx.array]) -> mx.array:
        """The kept embedding of `ids`, or make(ids) evaluated and kept. Only an evaluated embedding is kept: a lazy
        one would hold the text encoder's weights alive through its graph after the encoder is released."""
        key = tuple(ids)
        found = self._by_ids.get(key)
        if found is not None:
            self.hits += 1
            self._by_ids.move_to_end(key)
            return found
        self.misses += 1
        embedding = make(list(ids))
        mx.eval(embedding)
        self._by_ids[key] = embedding
        while len(self._by_ids) > self.kept:
            self._by_ids.popitem(last=False)
        return embedding

    def clear(self) -> None:
        self._by_ids.clear()
