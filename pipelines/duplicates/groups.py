"""Accepted pairs -> duplicate groups (union-find) -> the duplicates table and its counts.

One row per image in a group: group_id (1 = the largest group), group_size,
group_products, image_id, product_id, image_uri, similarity (its best accepted pair;
1.0 for an exact copy), match ("exact": it shares its bytes with an image of another
product in the group; else "near") and matched_image_id (the other image of that pair).
"""
from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa

COLUMNS = ("group_id", "group_size", "group_products", "image_id", "product_id",
           "image_uri", "similarity", "match", "matched_image_id")


class UnionFind:
    """Disjoint sets over string ids (path halving, union by size)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}

    def find(self, x: str) -> str:
        parent = self.parent
        if x not in parent:
            parent[x] = x
            self.size[x] = 1
            return x
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def groups(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return [sorted(members) for members in out.values()]


def build_groups(pairs: Iterable[dict[str, Any]], uris: dict[str, str]
                 ) -> tuple[pa.Table, list[dict[str, Any]]]:
    """(the duplicates table, the groups largest first: id, images, products, kind).

    `pairs`: accepted pairs {"a", "b", "product_a", "product_b", "score", "kind"};
    an exact and a near record of one pair count as exact.
    """
    uf = UnionFind()
    product: dict[str, str] = {}
    best: dict[str, tuple[float, str, str]] = {}  # image -> (score, kind, other image)
    for p in pairs:
        a, b = p["a"], p["b"]
        uf.union(a, b)
        product[a], product[b] = p["product_a"], p["product_b"]
        for me, other in ((a, b), (b, a)):
            cand = (float(p["score"]), p["kind"], other)
            cur = best.get(me)
            if cur is None or (cand[1] == "exact", cand[0]) > (cur[1] == "exact", cur[0]):
                best[me] = cand
    groups = sorted(uf.groups(), key=lambda g: (-len(g), g[0]))
    rows: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    described = []
    for gid, members in enumerate(groups, 1):
        products = sorted({product[m] for m in members})
        kinds = {best[m][1] for m in members}
        described.append({"group_id": gid, "images": members, "products": products,
                          "kind": "exact" if kinds == {"exact"} else
                          ("near" if kinds == {"near"} else "mixed")})
        for m in members:
            score, kind, other = best[m]
            for col, value in zip(COLUMNS, (gid, len(members), len(products), m, product[m],
                                            uris.get(m, ""), round(score, 6), kind, other)):
                rows[col].append(value)
    schema = pa.schema([("group_id", pa.int64()), ("group_size", pa.int64()),
                        ("group_products", pa.int64()), ("image_id", pa.string()),
                        ("product_id", pa.string()), ("image_uri", pa.string()),
                        ("similarity", pa.float64()), ("match", pa.string()),
                        ("matched_image_id", pa.string())])
    return pa.table(rows, schema=schema), described
