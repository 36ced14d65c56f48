"""Catalog and labelled query manifests from the Grocery Store Dataset (Klasson et al., WACV 2019).

    python benchmarks/grocery_manifests.py DATASET_DIR --out DIR [--no-train]

DATASET_DIR is the dataset's `dataset/` folder (classes.csv, train.txt, test.txt, ...).
Writes DIR/catalog.csv (one iconic packshot per product + the train photos, unless
--no-train), DIR/queries.csv (the test photos), DIR/train.csv (the train photos alone:
labelled shopper photos, embedded as `train-adapter --pairs`) and DIR/val.csv (the
dataset's 296 val photos: more labelled photos, never test ones): product_id = fine class name,
category = coarse class name, so a hit is a result of the same fine class; the iconic
rows also carry the product's `description` (the dataset's *_Description.txt), which the
serving text index uses for image + text search.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys

log = logging.getLogger("grocery_manifests")
FIELDS = ["product_id", "image_id", "image_uri", "title", "category", "description", "source"]


def _read_classes(dataset: str) -> dict[int, dict[str, str]]:
    path = os.path.join(dataset, "classes.csv")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found: pass the dataset's dataset/ folder")
    classes = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), 2):
            try:
                classes[int(row["Class ID (int)"])] = {
                    "name": row["Class Name (str)"], "coarse": row["Coarse Class Name (str)"],
                    "iconic": row["Iconic Image Path (str)"].lstrip("/"),
                    "description": _read_description(
                        dataset, row.get("Product Description Path (str)", ""))}
            except (KeyError, ValueError) as e:
                raise SystemExit(f"error: {path} line {line}: unexpected row ({e})") from e
    return classes


def _read_description(dataset: str, rel: str) -> str:
    """The product's description text (one paragraph), or "" when the file is missing."""
    path = os.path.join(dataset, rel.lstrip("/")) if rel else ""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return " ".join(f.read().split())


def _split_rows(dataset: str, split: str, classes: dict[int, dict[str, str]]
                ) -> list[dict[str, str]]:
    path = os.path.join(dataset, f"{split}.txt")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                raise SystemExit(f"error: {path} line {line_no}: expected 'path, fine, coarse'")
            rel, fine = parts[0], int(parts[1])
            cls = classes[fine]
            stem = os.path.splitext(os.path.basename(rel))[0]
            rows.append({"product_id": cls["name"], "image_id": f"{split}-{stem}",
                         "image_uri": os.path.abspath(os.path.join(dataset, rel)),
                         "title": cls["name"].replace("-", " "), "category": cls["coarse"],
                         "source": split})
    return rows


def write_manifests(dataset: str, out_dir: str, include_train: bool = True
                    ) -> tuple[str, str]:
    """Write catalog.csv, queries.csv, train.csv and val.csv; returns the first two paths."""
    classes = _read_classes(dataset)
    catalog = [{"product_id": c["name"], "image_id": f"iconic-{c['name']}",
                "image_uri": os.path.abspath(os.path.join(dataset, c["iconic"])),
                "title": c["name"].replace("-", " "), "category": c["coarse"],
                "description": c["description"], "source": "iconic"} for _, c in sorted(classes.items())]
    train = _split_rows(dataset, "train", classes)
    if include_train:
        catalog += train
    queries = _split_rows(dataset, "test", classes)
    val = _split_rows(dataset, "val", classes)
    missing = [r["image_uri"] for r in catalog + queries + train + val
               if not os.path.exists(r["image_uri"])]
    if missing:
        raise SystemExit(f"error: {len(missing)} listed images do not exist, e.g. {missing[0]}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, rows in (("catalog.csv", catalog), ("queries.csv", queries),
                       ("train.csv", train), ("val.csv", val)):
        path = os.path.join(out_dir, name)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        log.info("%s: %d rows", path, len(rows))
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="the Grocery Store Dataset's dataset/ folder")
    p.add_argument("--out", required=True, help="folder for catalog.csv and queries.csv")
    p.add_argument("--no-train", action="store_true",
                   help="catalog = iconic images only (81 images)")
    args = p.parse_args(argv)
    catalog, queries = write_manifests(args.dataset, args.out, include_train=not args.no_train)
    print(catalog)
    print(queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
