"""Hostile HTTP requests for the search service (holds no tests).

Used by tests/reliability/test_http_hostile.py and benchmarks/reliability_soak.py: each
case is (kind, method, path, httpx request keyword arguments); the service must answer
every one with a status below 500 (the one allowed 5xx is 503 `busy` from the decode
slots, which these cases do not provoke on their own).
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

HostileCase = tuple[str, str, str, dict[str, Any]]


def png_bomb(width: int = 6000, height: int = 6000) -> bytes:
    """A 1-bit black PNG of width x height: ~4 KB on the wire, ~36 MP once decoded."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0,
                                                              0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def gif_header_bomb() -> bytes:
    """A GIF whose header claims 65535 x 65535 pixels (a few dozen bytes)."""
    return (b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x80\x00\x00"
            + b"\x00\x00\x00\xff\xff\xff" + b",\x00\x00\x00\x00"
            + struct.pack("<HH", 65535, 65535) + b"\x00\x02\x02\x44\x01\x00;")


def html_gif() -> bytes:
    """A valid 1x1 GIF with an HTML/script payload appended (the stored-XSS file)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, "GIF")
    return buf.getvalue() + b"<html><script>alert(document.domain)</script></html>"


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
       b'height="10"><script>alert(1)</script><rect width="10" height="10"/></svg>')


def _upload(data: bytes, name: str = "q.jpg", ctype: str = "image/jpeg",
            **fields: str) -> dict[str, Any]:
    return {"files": {"image": (name, data, ctype)}, "data": fields}


def _json(raw: bytes | str) -> dict[str, Any]:
    return {"content": raw if isinstance(raw, bytes) else raw.encode(),
            "headers": {"content-type": "application/json"}}


def hostile_cases(dim: int, good_image: bytes, known_image_id: str) -> list[HostileCase]:
    """Every hostile request kind (about 60) against an index of `dim`-d vectors."""
    ones = ", ".join(["1"] * (dim - 1))
    deep = "[" * 100_000 + "]" * 100_000
    nested_filter = {"category": json.loads("[" * 6 + '"a"' + "]" * 6)}
    cases: list[HostileCase] = [
        # JSON bodies: nesting, numbers, types, sizes
        ("json_deep_array_body", "POST", "/v1/search", _json(deep)),
        ("json_deep_object_body", "POST", "/v1/search",
         _json('{"a":' * 50_000 + "1" + "}" * 50_000)),
        ("json_deep_vector", "POST", "/v1/search", _json('{"vector": ' + deep + "}")),
        ("json_deep_filters", "POST", "/v1/search",
         _json('{"vector": [' + ones + ', 1], "filters": {"category": '
               + "[" * 20_000 + "]" * 20_000 + "}}")),
        ("json_nested_filter_values", "POST", "/v1/search",
         {"json": {"vector": [1.0] * dim, "filters": nested_filter}}),
        ("json_huge_int", "POST", "/v1/search", _json('{"vector": [10' + "0" * 400 + ", "
                                                      + ones + "]}")),
        ("json_huge_float", "POST", "/v1/search", _json('{"vector": [1e400, ' + ones + "]}")),
        ("json_float32_overflow", "POST", "/v1/search", _json('{"vector": [1e39, ' + ones
                                                              + "]}")),
        ("json_nan", "POST", "/v1/search", _json('{"vector": [NaN, ' + ones + "]}")),
        ("json_infinity", "POST", "/v1/search", _json('{"vector": [-Infinity, ' + ones + "]}")),
        ("json_int_too_many_digits", "POST", "/v1/search",
         _json('{"vector": [' + "9" * 5000 + ", " + ones + "]}")),
        ("json_k_huge", "POST", "/v1/search", _json('{"vector": [' + ones + ', 1], "k": 1'
                                                    + "0" * 400 + "}")),
        ("json_k_float", "POST", "/v1/search", {"json": {"vector": [1.0] * dim, "k": 2.5}}),
        ("json_k_negative", "POST", "/v1/search", {"json": {"vector": [1.0] * dim, "k": -1}}),
        ("json_zero_vector", "POST", "/v1/search", {"json": {"vector": [0.0] * dim}}),
        ("json_long_vector", "POST", "/v1/search", {"json": {"vector": [0.5] * 100_000}}),
        ("json_vector_object", "POST", "/v1/search", {"json": {"vector": {"0": 1}}}),
        ("json_vector_bools", "POST", "/v1/search", {"json": {"vector": [True] * dim}}),
        ("json_vector_nested", "POST", "/v1/search", {"json": {"vector": [[1.0]] * dim}}),
        ("json_top_level_array", "POST", "/v1/search", {"json": [1, 2, 3]}),
        ("json_top_level_string", "POST", "/v1/search", {"json": "vector"}),
        ("json_null", "POST", "/v1/search", _json("null")),
        ("json_empty_body", "POST", "/v1/search", _json(b"")),
        ("json_not_utf8", "POST", "/v1/search", _json(b'{"vector": ["\xff\xfe"]}')),
        ("json_lone_surrogate", "POST", "/v1/search", _json('{"vector": ["\\ud800"]}')),
        ("json_too_large", "POST", "/v1/search", _json(b"[" + b"1," * 700_000 + b"1]")),
        ("json_filters_string", "POST", "/v1/search",
         {"json": {"vector": [1.0] * dim, "filters": "category"}}),
        ("json_filters_too_many_keys", "POST", "/v1/search",
         {"json": {"vector": [1.0] * dim, "filters": {f"k{i}": 1 for i in range(100)}}}),
        ("json_filter_key_long", "POST", "/v1/search",
         {"json": {"vector": [1.0] * dim, "filters": {"x" * 100_000: 1}}}),
        ("json_collapse_object", "POST", "/v1/search",
         {"json": {"vector": [1.0] * dim, "collapse": {"a": 1}}}),
        # multipart: framing, content types, sizes
        ("multipart_no_boundary", "POST", "/v1/search",
         {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}),
        ("multipart_broken", "POST", "/v1/search",
         {"content": b"--abc\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nxx",
          "headers": {"content-type": "multipart/form-data; boundary=abc"}}),
        ("multipart_two_images", "POST", "/v1/search",
         {"files": [("image", ("a.jpg", good_image, "image/jpeg")),
                    ("image", ("b.jpg", good_image, "image/jpeg"))]}),
        ("multipart_many_fields", "POST", "/v1/search",
         {"files": {"image": ("q.jpg", good_image, "image/jpeg")},
          "data": {f"f{i}": "1" for i in range(200)}}),
        ("multipart_image_as_text_field", "POST", "/v1/search", {"data": {"image": "abc"}}),
        ("multipart_deep_filters", "POST", "/v1/search",
         _upload(good_image, filters="[" * 50_000 + "]" * 50_000)),
        ("multipart_nested_filters", "POST", "/v1/search",
         _upload(good_image, filters=json.dumps(nested_filter))),
        ("upload_text_as_jpeg", "POST", "/v1/search", _upload(b"hello, I am text " * 100)),
        ("upload_html", "POST", "/v1/search",
         _upload(b"<html><script>alert(1)</script></html>", "x.html", "text/html")),
        ("upload_svg", "POST", "/v1/search", _upload(SVG, "x.svg", "image/svg+xml")),
        ("upload_html_in_gif", "POST", "/v1/search", _upload(html_gif(), "x.gif", "image/gif")),
        ("upload_pdf", "POST", "/v1/search",
         _upload(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "x.pdf", "application/pdf")),
        ("upload_eps", "POST", "/v1/search",
         _upload(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "x.eps")),
        ("upload_png_bomb", "POST", "/v1/search", _upload(png_bomb(), "bomb.png", "image/png")),
        ("upload_gif_header_bomb", "POST", "/v1/search",
         _upload(gif_header_bomb(), "bomb.gif", "image/gif")),
        ("upload_truncated_png", "POST", "/v1/search", _upload(png_bomb(64, 64)[:40])),
        ("upload_oversized", "POST", "/v1/search", _upload(b"\xff\xd8\xff" + b"0" * 12_000_000)),
        ("unsupported_content_type", "POST", "/v1/search",
         {"content": b"<x/>", "headers": {"content-type": "application/xml"}}),
        ("no_content_type", "POST", "/v1/search", {"content": b"{}"}),
        # ids and paths: traversal, encoding, length
        ("image_traversal_encoded", "GET", "/v1/images/..%2f..%2f..%2fetc%2fpasswd", {}),
        ("image_traversal_dots", "GET", "/v1/images/%2e%2e/%2e%2e/etc/passwd", {}),
        ("image_traversal_absolute", "GET", "/v1/images/%2fetc%2fpasswd", {}),
        ("image_nul", "GET", "/v1/images/a%00b", {}),
        ("image_long_id", "GET", "/v1/images/" + "a" * 20_000, {}),
        ("image_script_id", "GET", "/v1/images/%3Cscript%3Ealert(1)%3C%2Fscript%3E", {}),
        ("similar_traversal", "GET", "/v1/products/..%2f..%2fetc/similar", {}),
        ("similar_deep_filters", "GET", "/v1/products/P0001/similar",
         {"params": {"filters": "[" * 10_000 + "]" * 10_000}}),
        ("similar_nested_filters", "GET", "/v1/products/P0001/similar",
         {"params": {"filters": json.dumps(nested_filter)}}),
        ("similar_k_overflow", "GET", "/v1/products/P0001/similar", {"params": {"k": "1" * 400}}),
        ("similar_k_inf", "GET", f"/v1/images/{known_image_id}/similar",
         {"params": {"k": "inf"}}),
        ("reload_force_garbage", "POST", "/v1/reload", {"params": {"force": "maybe"}}),
        ("method_not_allowed", "DELETE", "/v1/reload", {}),
        ("unknown_path", "GET", "/v1/../../etc/passwd", {}),
    ]
    return cases
