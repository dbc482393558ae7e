"""The tokenizer's training sample, and the seeded text hash it is drawn by.

The sample is drawn in one streaming pass with bounded memory: every document gets a seeded
64-bit hash of its text and the documents with the smallest hashes are kept in a heap
(bottom-k sampling), so the sample is independent of document order and of how the corpus is
split into files. The smallest ``heldout_documents`` hashes are held back for the report.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import xxhash


def text_hash(text: str, seed: int) -> int:
    """Seeded 64-bit hash of a text (stable across runs and machines, unlike ``hash()``)."""
    return xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass"), seed=seed)


def sample_documents(
    texts: Iterable[str], n_train: int, n_heldout: int, max_bytes: int, seed: int
) -> tuple[list[str], list[str], int]:
    """Bottom-k sample by text hash in one pass: ``(train, heldout, documents_seen)``.

    At most a tenth of the sampled documents is held out.

    Memory holds at most ``n_train + n_heldout`` documents and about ``max_bytes`` of text
    (documents with the largest hashes are evicted first when the byte budget is exceeded).
    """
    k = n_train + n_heldout
    heap: list[tuple[int, str]] = []  # max-heap by hash via negated keys
    held_bytes = 0
    seen = 0
    for text in texts:
        seen += 1
        h = text_hash(text, seed)
        if len(heap) >= k and -heap[0][0] <= h:
            continue
        heapq.heappush(heap, (-h, text))
        held_bytes += len(text.encode("utf-8", "surrogatepass"))
        while len(heap) > k or (held_bytes > max_bytes and len(heap) > n_heldout + 1):
            _, dropped = heapq.heappop(heap)
            held_bytes -= len(dropped.encode("utf-8", "surrogatepass"))
    ordered = [text for _, text in sorted(heap, key=lambda item: (-item[0], item[1]))]
    n_heldout = min(n_heldout, len(ordered) // 10)  # a small corpus keeps 90% for training
    return ordered[n_heldout:], ordered[:n_heldout], seen
