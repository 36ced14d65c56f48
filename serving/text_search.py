"""BM25 text search over the catalog's products, built from the index's row table at load.

Each product is one document: the distinct values of the configured metadata fields
(`fusion.text_fields`, e.g. title, category, description; `product_id` names the id
itself) over all its rows, joined. Ranking is BM25 (Lucene variant, k1 1.5, b 0.75) from
the maintained `bm25s` library, English stop words removed, tokens = runs of 2+ word
characters, lower-cased.

The choice: the text index is built when serving loads an index version (next to the
ScaNN shards, in the background reload, before the swap), not stored in the artifact.
The rows table already carries every metadata field under the artifact's checksums, so
there is nothing new to publish, verify or keep in step with the vectors, and changing
`fusion.text_fields` needs no rebuild. Cost: tokenising the catalog once per load
(measured in docs/EVALUATION.md).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    from serving.loaded_index import LoadedIndex

log = logging.getLogger(__name__)

# Per product, text beyond this many characters is not indexed (a runaway description
# must not make one document dominate memory).
MAX_DOC_CHARS = 20_000
# Score vectors of this many recent query texts are kept (each is 4 bytes x products).
SCORE_CACHE = 256


class TextIndex:
    """BM25 over one text document per product; scores for a query over all products."""

    def __init__(self, product_ids: Sequence[str], documents: Sequence[str]):
        import bm25s
        # bm25s sets its own logger to DEBUG on import ("Building index from IDs objects"
        # on every index): keep it to warnings, like the other libraries we quiet.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        if len(product_ids) != len(documents):
            raise ValueError("one document per product is needed")
        started = time.perf_counter()
        self.product_ids = list(product_ids)
        self._position = {p: i for i, p in enumerate(self.product_ids)}
        self._bm25s = bm25s
        tokens = bm25s.tokenize(list(documents) or [""], stopwords="en", show_progress=False)
        self._retriever = bm25s.BM25()
        self._retriever.index(tokens, show_progress=False)
        self._vocab = set(self._retriever.vocab_dict)
        self.build_seconds = time.perf_counter() - started
        self.row_product: np.ndarray | None = None  # set by build_text_index
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.product_ids)

    def tokens(self, text: str) -> list[str]:
        """The query's tokens that occur in the catalog (others cannot score)."""
        tok = self._bm25s.tokenize([text], stopwords="en", return_ids=False,
                                   show_progress=False)
        return [t for t in tok[0] if t in self._vocab]

    def scores(self, text: str) -> np.ndarray:
        """float32 [num_products] (read-only): the BM25 score of every product (0 = no match).

        The last SCORE_CACHE distinct texts are remembered (popular queries repeat).
        """
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        toks = self.tokens(text)
        if not toks or not self.product_ids:
            out = np.zeros(len(self.product_ids), np.float32)
        else:
            out = np.asarray(self._retriever.get_scores(toks), dtype=np.float32)
        out.setflags(write=False)
        with self._lock:
            if len(self._cache) >= SCORE_CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[text] = out
        return out

    def position(self, product_id: str) -> int | None:
        return self._position.get(product_id)


def product_documents(idx: "LoadedIndex", fields: Iterable[str]) -> tuple[list[str], list[str]]:
    """(product ids, one text per product) from the loaded rows' metadata."""
    fields = list(fields)
    parts: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for row in range(idx.num_vectors):
        pid = idx.product_id(row)
        values = parts.setdefault(pid, [])
        known = seen.setdefault(pid, set())
        meta: dict[str, Any] | None = None
        for field in fields:
            if field == "product_id":
                value: Any = pid
            else:
                if meta is None:
                    meta = idx.metadata(row)
                value = meta.get(field)
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                continue
            text = str(value).strip()
            if text and text not in known:
                known.add(text)
                values.append(text)
    ids = sorted(parts)
    return ids, [" ".join(parts[p])[:MAX_DOC_CHARS] for p in ids]


def build_text_index(idx: "LoadedIndex", fields: Iterable[str]) -> TextIndex:
    """The BM25 index of a loaded index version (called once per version load)."""
    started = time.perf_counter()
    ids, docs = product_documents(idx, fields)
    text_index = TextIndex(ids, docs)
    # row -> product position, so fusion looks up the text score of many rows at once
    text_index.row_product = np.fromiter(
        (text_index.position(idx.product_id(r)) for r in range(idx.num_vectors)),
        dtype=np.int64, count=idx.num_vectors)
    log.info("text index of %s: %d products, %.2fs", idx.version, len(ids),
             time.perf_counter() - started)
    return text_index
