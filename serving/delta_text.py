"""The text index of a version plus its deltas (serving.delta_index.DeltaIndex): the
version's BM25 index, extended with a small BM25 index over the products only the deltas
hold (scored on their own statistics until the next full build folds them in)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipelines.index.sharded_search import parse_metadata


class DeltaTextIndex:
    """The version's BM25 text index, extended with the products only deltas hold."""

    def __init__(self, base: Any, extra: Any, delta_row_positions: np.ndarray):
        self.base = base
        self.extra = extra  # serving.text_search.TextIndex over delta-only products, or None
        self.product_ids = list(base.product_ids) + (list(extra.product_ids) if extra else [])
        self._offset = len(base.product_ids)
        self.build_seconds = base.build_seconds + (extra.build_seconds if extra else 0.0)
        base_rows = base.row_product if base.row_product is not None else np.zeros(0, np.int64)
        self.row_product = np.concatenate([base_rows, delta_row_positions]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.product_ids)

    def tokens(self, text: str) -> list[str]:
        toks = self.base.tokens(text)
        if self.extra is not None:
            toks += [t for t in self.extra.tokens(text) if t not in toks]
        return toks

    def scores(self, text: str) -> np.ndarray:
        base = self.base.scores(text)
        if self.extra is None:
            return base
        return np.concatenate([base, self.extra.scores(text)])

    def position(self, product_id: str) -> int | None:
        pos = self.base.position(product_id)
        if pos is None and self.extra is not None:
            extra = self.extra.position(product_id)
            return None if extra is None else self._offset + extra
        return pos


def delta_text_index(base_ti: Any, product_ids: Sequence[str], metadata: Sequence[str],
                     fields: Sequence[str]) -> Any:
    """`base_ti` (the version's TextIndex, or None) with the delta rows' products
    (`product_ids[j]`, `metadata[j]` of delta row j) added; `base_ti` itself when there are
    no delta rows."""
    if base_ti is None:
        return None
    if not product_ids:
        return base_ti
    new_products = sorted({p for p in product_ids if base_ti.position(p) is None})
    extra = None
    if new_products:
        from serving.text_search import TextIndex
        docs: dict[str, list[str]] = {p: [] for p in new_products}
        for pid, text in zip(product_ids, metadata):
            if pid not in docs:
                continue
            meta = parse_metadata(text)
            for f in fields:
                value: Any = pid if f == "product_id" else meta.get(f)
                if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    s = str(value).strip()
                    if s and s not in docs[pid]:
                        docs[pid].append(s)
        extra = TextIndex(new_products, [" ".join(docs[p]) for p in new_products])
    wrapped = DeltaTextIndex(base_ti, extra, np.zeros(0, np.int64))
    positions = [wrapped.position(p) for p in product_ids]
    wrapped.row_product = np.concatenate([wrapped.row_product, np.asarray(
        [-1 if p is None else p for p in positions], np.int64)])
    return wrapped
