"""The HTML page of an evaluation (serving/evaluate.py): metric tables (published index /
exact search) and example queries with their top results as inlined thumbnails."""
from __future__ import annotations

import base64
import html
import io
from typing import Any

from pipelines.core import filesystem as fs
from serving.evaluate_metrics import METRIC_NAMES

EXAMPLE_RESULTS = 5  # top products kept per query for the page's examples


def _thumbnail(data: bytes, side: int = 112) -> str:
    """A small JPEG data: URI of an image (or an empty string when it cannot be read)."""
    from PIL import Image
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        img.draft("RGB", (side * 2, side * 2))
        img = img.convert("RGB")
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    except Exception:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _metrics_table(title: str, groups: dict[str, dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(m)}<br><small>index / exact</small></th>"
                   for m in METRIC_NAMES)
    body = []
    for name, g in groups.items():
        cells = "".join(f"<td>{g['index'][m]:.3f} / {g['exact'][m]:.3f}</td>"
                        for m in METRIC_NAMES)
        body.append(f"<tr><th>{html.escape(name)}</th><td>{g['queries']}</td>{cells}</tr>")
    return (f"<h2>{html.escape(title)}</h2><table><tr><th></th><th>queries</th>{head}</tr>"
            + "".join(body) + "</table>")


def _pick_examples(per_query: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Evenly spread queries, half of them misses when there are misses (deterministic)."""
    misses = [q for q in per_query if not q["index"]["recall@1"]]
    hits = [q for q in per_query if q["index"]["recall@1"]]

    def spread(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
        if n <= 0 or not items:
            return []
        step = max(1, len(items) // n)
        return items[::step][:n]
    chosen_misses = spread(misses, count // 2)
    return spread(hits, count - len(chosen_misses)) + chosen_misses


def render_html(report: dict[str, Any], idx: Any, max_examples: int = 40) -> str:
    """A self-contained HTML page: metric tables and query → result thumbnails."""
    overall = {"all queries": {"queries": report["queries"], **report["overall"]}}
    examples = []
    for q in _pick_examples(report["per_query"], max_examples):
        try:
            query_thumb = _thumbnail(fs.read_bytes(q["image_uri"]))
        except Exception:
            query_thumb = ""
        cells = [f'<figure class="query"><img src="{query_thumb}" alt="query"><figcaption>'
                 f'query<br>{html.escape(q["product_id"])}</figcaption></figure>']
        for r in q["results"]:
            uri = idx.image_uri(r["image_id"])
            try:
                thumb = _thumbnail(fs.read_bytes(uri)) if uri else ""
            except Exception:
                thumb = ""
            mark = "hit" if r["hit"] else "miss"
            cells.append(f'<figure class="{mark}"><img src="{thumb}" alt="{mark}">'
                         f'<figcaption>{"✔" if r["hit"] else "✘"} '
                         f'{html.escape(r["product_id"])}<br>{r["score"]:.3f}</figcaption>'
                         f'</figure>')
        examples.append('<div class="row">' + "".join(cells) + "</div>")
    skipped = "".join(f"<li>{html.escape(s['source'])}: {html.escape(s['reason'])}: "
                      f"{html.escape(s['message'])}</li>" for s in report["skipped"][:50])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation of {html.escape(report['version'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; font-size: .85rem; }}
td, th {{ border: 1px solid #ccc; padding: .25rem .5rem; text-align: right; }}
.row {{ display: flex; gap: .4rem; margin-bottom: .6rem; align-items: flex-start; }}
figure {{ margin: 0; width: 116px; text-align: center; font-size: .75rem; }}
figure img {{ width: 112px; height: 112px; object-fit: contain; background: #eee; border: 3px solid transparent; }}
.query img {{ border-color: #23395d; }} .hit img {{ border-color: #1a9641; }} .miss img {{ border-color: #d7191c; }}
</style></head><body>
<h1>Evaluation of index version {html.escape(report['version'])}</h1>
<p>Index <code>{html.escape(report['index_root'])}</code> · model {html.escape(str(report['model_id']))}
· {report['num_vectors']} vectors · {report['num_products']} products · {report['queries']} queries
from <code>{html.escape(report['queries_file'])}</code> ({len(report['skipped'])} skipped).
Each cell: published index / exact search. Recall@k on products (best image per product);
precision@1 and mAP@10 on images.</p>
{_metrics_table("Overall", overall)}
{_metrics_table("By category", report["by_category"])}
<h2>Examples (query → top {EXAMPLE_RESULTS} products; green = same product)</h2>
{''.join(examples)}
{_metrics_table("By product", report["by_product"])}
{f'<h2>Skipped queries</h2><ul>{skipped}</ul>' if skipped else ''}
</body></html>
"""
