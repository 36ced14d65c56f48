"""A catalog with planted duplicates for the duplicates tests (holds no tests).

The generated sample catalog (pipelines.embed.sample_catalog: every product shot a few
times, products of one category share a shape: distinct look-alikes) plus, each under a
new product id: an exact byte copy of one image, and a re-encoded (JPEG quality 55), a
resized (60 %) and a cropped (88 %, off-centre) copy of three others.
"""
from __future__ import annotations

import csv
import io
import os

from PIL import Image

PLANTED = {  # new product -> (how, source image)
    "DUP-EXACT": ("exact", "P0001-0"),
    "DUP-REENC": ("reencoded", "P0002-1"),
    "DUP-RESIZE": ("resized", "P0003-0"),
    "DUP-CROP": ("cropped", "P0004-2"),
}


def planted_copy(data: bytes, how: str) -> bytes:
    if how == "exact":
        return data
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if how == "resized":
        img = img.resize((int(w * 0.6), int(h * 0.6)), Image.Resampling.LANCZOS)
    elif how == "cropped":
        cw, ch = int(w * 0.88), int(h * 0.88)
        left, top = int((w - cw) * 0.3), int((h - ch) * 0.6)
        img = img.crop((left, top, left + cw, top + ch))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=55 if how == "reencoded" else 90)
    return buf.getvalue()


def write_planted_catalog(out_dir: str, num_products: int = 10, images_per_product: int = 3
                          ) -> str:
    """The catalog manifest (CSV) with the planted copies appended."""
    from pipelines.embed.sample_catalog import write_catalog
    manifest = write_catalog(os.path.join(out_dir, "catalog"), num_products=num_products,
                             images_per_product=images_per_product, size=128, seed=5)
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_image = {r["image_id"]: r for r in rows}
    planted_dir = os.path.join(out_dir, "planted")
    os.makedirs(planted_dir, exist_ok=True)
    for pid, (how, source) in PLANTED.items():
        src = by_image[source]
        with open(src["image_uri"], "rb") as f:
            data = planted_copy(f.read(), how)
        path = os.path.join(planted_dir, f"{pid}.jpg")
        with open(path, "wb") as f:
            f.write(data)
        rows.append({**src, "product_id": pid, "image_id": f"{pid}-0", "image_uri": path,
                     "title": f"relisted {src['title']}"})
    out = os.path.join(out_dir, "manifest.csv")
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out
