"""The duplicates report: one self-contained HTML page (inline CSS, thumbnails as data:
URIs, no script), the groups largest first, each with its images, products, similarities
and match kind. Every catalog value is HTML-escaped; images are decoded with the
project's decoder and re-encoded as small JPEGs, so nothing from the catalog reaches the
page unescaped or as markup.
"""
from __future__ import annotations

import base64
import html
import io
import logging
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

THUMBNAIL_PX = 160

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.4rem}table.counts td{padding:0 1rem 0 0}
section.group{border-top:1px solid #ccc;padding:.8rem 0}
section.group h2{font-size:1rem;margin:.2rem 0}
ul.images{display:flex;flex-wrap:wrap;gap:.6rem;list-style:none;padding:0}
ul.images li{width:170px;font-size:12px;word-break:break-all}
ul.images img{width:160px;height:160px;object-fit:contain;background:#f4f4f4;display:block}
.exact{color:#a00;font-weight:600}.near{color:#06c}.muted{color:#777}
"""


def thumbnail_data_uri(data: bytes, max_pixels: int) -> str:
    """A small JPEG data: URI of image bytes (DecodeError if they are not an image)."""
    from pipelines.model.image_decode import decode_image
    img = decode_image(data, max_pixels=max_pixels, target_size=THUMBNAIL_PX)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_report(groups: list[dict[str, Any]], rows: Mapping[str, dict[str, Any]],
                  summary: Mapping[str, Any], thumbnail: Callable[[str, str], str | None],
                  max_groups: int, max_images: int) -> str:
    """The HTML page. `rows`: image_id -> its duplicates-table row; `thumbnail(image_id,
    uri)`: a data: URI or None (unreadable image)."""
    e = html.escape
    counts = [("index version", summary.get("version")),
              ("images searched", summary.get("images_scanned")),
              ("threshold", summary.get("threshold")),
              ("candidate threshold", summary.get("candidate_threshold")),
              ("pixel threshold", summary.get("pixel_threshold")),
              ("pairs accepted (near / exact)",
               f"{summary.get('near_pairs')} / {summary.get('exact_pairs')}"),
              ("groups", summary.get("groups")),
              ("images in groups", summary.get("images_in_groups")),
              ("products in groups", summary.get("products_in_groups"))]
    out = ["<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           "<title>Duplicate listings report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>Duplicate listings report</h1>", "<table class=\"counts\">"]
    out += [f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in counts]
    out.append("</table>")
    if not groups:
        out.append("<p id=\"no-groups\">No duplicate images across products at this "
                   "threshold.</p>")
    shown = groups[:max_groups]
    if len(groups) > len(shown):
        out.append(f"<p class=\"muted\">Showing the {len(shown)} largest of {len(groups)} "
                   f"groups; duplicates.parquet / duplicates.csv list them all.</p>")
    for g in shown:
        members = g["images"]
        out.append(f"<section class=\"group\" id=\"group-{g['group_id']}\" "
                   f"data-size=\"{len(members)}\" data-kind=\"{e(g['kind'])}\">")
        out.append(f"<h2>Group {g['group_id']}: {len(members)} images, "
                   f"{len(g['products'])} products ({e(g['kind'])})</h2>")
        out.append("<ul class=\"images\">")
        for image_id in members[:max_images]:
            row = rows[image_id]
            src = thumbnail(image_id, row["image_uri"])
            img = (f"<img src=\"{e(src)}\" alt=\"{e(image_id)}\">" if src
                   else "<div class=\"muted\">(image unavailable)</div>")
            out.append(f"<li data-image-id=\"{e(image_id)}\">{img}"
                       f"<div>product <b>{e(row['product_id'])}</b></div>"
                       f"<div>image {e(image_id)}</div>"
                       f"<div class=\"{e(row['match'])}\">{e(row['match'])} "
                       f"{row['similarity']:.3f}</div></li>")
        if len(members) > max_images:
            out.append(f"<li class=\"muted\">and {len(members) - max_images} more</li>")
        out.append("</ul></section>")
    out.append("</body></html>")
    return "\n".join(out)
