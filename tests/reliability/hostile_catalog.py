"""Hostile catalogs for the reliability suite: bad rows and images, and wholly bad manifests.

`write_hostile_catalog(folder)` writes one catalog of three manifests (CSV, JSONL,
Parquet) in which every row is one *kind* of hostile or awkward input, and returns the
kinds with the outcome each must have: "embedded" or "<stage>/<reason>" (the dead
letter). `write_bad_manifests(folder)` writes manifests that are bad as a whole, each
with the message the job must fail with before anything runs (or "ok" for awkward
but valid files: BOM, CRLF, quoted newlines).

Everything is generated in code (Pillow, pyarrow); nothing is downloaded.
"""
from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import image_factory as f

EMBEDDED = "embedded"


@dataclass(frozen=True)
class RowKind:
    """One row of the hostile catalog and the outcome the embed job must give it."""
    kind: str
    expected: str        # "embedded" or "<stage>/<reason>"
    source: str          # "<manifest path>:<line or row number>", as dead letters record it
    image_id: str        # the image_id an embedded row must have ("" when irrelevant)


@dataclass(frozen=True)
class BadManifest:
    """A wholly bad (or awkward but valid) manifest and what the job must do with it."""
    kind: str
    uri: str
    expected: str        # a substring of the error message, or "ok" (the job runs)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _zero_size_png() -> bytes:
    """A PNG whose IHDR declares 0 x 0 pixels (valid CRC)."""
    data = bytearray(_png(Image.new("RGB", (4, 4))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", 0, 0)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _animated_gif() -> bytes:
    frames = [Image.new("P", (48, 48), i * 40) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    return {
        "good.jpg": f.jpeg_bytes(),
        "good2.jpg": f.jpeg_bytes(color=(10, 200, 10)),
        "noise.png": _png(noise),
        "empty.jpg": b"",
        "truncated.jpg": f.truncated_jpeg(),
        "text.jpg": b"just some text, definitely not pixels\n" * 4,
        "page.jpg": b"<!doctype html><html><body><script>alert(1)</script></body></html>",
        "bomb.png": f.decompression_bomb_png(),
        "huge_dims.png": f.decompression_bomb_png(60_000, 1_000),
        "zero_size.png": _zero_size_png(),
        "cmyk.jpg": f.cmyk_jpeg(),
        "deep16.png": f.png16_bytes(),
        "palette.png": f.palette_transparent_png(),
        "rgba.png": _png(Image.new("RGBA", (40, 30), (255, 0, 0, 128))),
        "la.png": _png(Image.new("LA", (40, 30), (90, 200))),
        "bilevel.png": _png(Image.new("1", (40, 30), 1)),
        "animated.gif": _animated_gif(),
        "rotated.jpg": f.exif_rotated_jpeg(),
        "tiny.png": _png(Image.new("RGB", (1, 1), (1, 2, 3))),
        "strip.png": _png(Image.new("RGB", (2000, 2), (9, 9, 9))),
        "gif_with_html.html": (_png(Image.new("RGB", (8, 8))) + b"<script>alert(1)</script>"),
        "big.bin": os.urandom(300_000),
    }


#: fetch.max_bytes the hostile-catalog run must use (big.bin is larger: fetch/too_large).
MAX_BYTES = 200_000


def write_hostile_catalog(folder: str) -> tuple[list[str], list[RowKind]]:
    """Write the catalog under `folder`; returns (manifest paths, row kinds in order)."""
    img = os.path.join(folder, "img")
    os.makedirs(img, exist_ok=True)
    for name, data in _images().items():
        with open(os.path.join(img, name), "wb") as fh:
            fh.write(data)
    os.mkfifo(os.path.join(img, "fifo.jpg"))
    os.makedirs(os.path.join(img, "folder.jpg"), exist_ok=True)
    os.symlink(os.path.join(img, "good.jpg"), os.path.join(img, "link.jpg"))
    os.symlink(os.path.join(img, "loop_a.jpg"), os.path.join(img, "loop_b.jpg"))
    os.symlink(os.path.join(img, "loop_b.jpg"), os.path.join(img, "loop_a.jpg"))
    good_abs = os.path.abspath(os.path.join(img, "good.jpg"))

    from pipelines.core import filesystem as fs
    try:
        fs.check_supported("gs://bucket/x.jpg")
        gs_expected = "fetch/not_found"       # apache-beam[gcp] installed: no such bucket
    except fs.UnsupportedUriError:
        gs_expected = "fetch/filesystem_unavailable"

    kinds: list[RowKind] = []

    # ---- CSV manifest: (kind, product_id, image_id, image_uri, expected, embedded id)
    csv_rows = [
        ("good_jpeg", "p-good", "good", "img/good.jpg", EMBEDDED, "good"),
        ("missing_file", "p-missing", "missing", "img/nope.jpg", "fetch/not_found", ""),
        ("empty_file", "p-empty", "empty", "img/empty.jpg", "decode/empty", ""),
        ("truncated_jpeg", "p-trunc", "trunc", "img/truncated.jpg", "decode/truncated", ""),
        ("text_not_image", "p-text", "text", "img/text.jpg", "decode/not_an_image", ""),
        ("html_named_jpg", "p-html", "html", "img/page.jpg", "decode/not_an_image", ""),
        ("decompression_bomb_png", "p-bomb", "bomb", "img/bomb.png",
         "decode/too_many_pixels", ""),
        ("huge_dimensions_png", "p-huge", "huge", "img/huge_dims.png",
         "decode/too_many_pixels", ""),
        ("zero_size_png", "p-zero", "zero", "img/zero_size.png", "decode/not_an_image", ""),
        ("cmyk_jpeg", "p-cmyk", "cmyk", "img/cmyk.jpg", EMBEDDED, "cmyk"),
        ("png_16_bit", "p-deep", "deep", "img/deep16.png", EMBEDDED, "deep"),
        ("palette_transparency", "p-pal", "pal", "img/palette.png", EMBEDDED, "pal"),
        ("rgba_alpha", "p-rgba", "rgba", "img/rgba.png", EMBEDDED, "rgba"),
        ("grey_alpha_la", "p-la", "la", "img/la.png", EMBEDDED, "la"),
        ("bilevel_1bit", "p-bilevel", "bilevel", "img/bilevel.png", EMBEDDED, "bilevel"),
        ("animated_gif", "p-gif", "gif", "img/animated.gif", EMBEDDED, "gif"),
        ("exif_rotated", "p-rot", "rot", "img/rotated.jpg", EMBEDDED, "rot"),
        ("one_pixel", "p-tiny", "tiny", "img/tiny.png", EMBEDDED, "tiny"),
        ("extreme_aspect_ratio", "p-strip", "strip", "img/strip.png", EMBEDDED, "strip"),
        ("image_named_html", "p-gifhtml", "gifhtml", "img/gif_with_html.html", EMBEDDED,
         "gifhtml"),
        ("over_byte_limit", "p-big", "big", "img/big.bin", "fetch/too_large", ""),
        ("path_traversal_relative", "p-trav", "trav", "../" * 12 + "etc/passwd",
         "decode/not_an_image", ""),
        ("path_traversal_missing", "p-trav2", "trav2", "../" * 12 + "no/such/secret.jpg",
         "fetch/not_found", ""),
        ("fifo", "p-fifo", "fifo", "img/fifo.jpg", "fetch/not_regular_file", ""),
        ("directory_as_uri", "p-dir", "dir", "img/folder.jpg", "fetch/not_regular_file", ""),
        ("device_file", "p-dev", "dev", "/dev/zero", "fetch/not_regular_file", ""),
        ("symlink_to_image", "p-link", "link", "img/link.jpg", EMBEDDED, "link"),
        ("symlink_loop", "p-loop", "loop", "img/loop_a.jpg", "fetch/io_error", ""),
        ("unsupported_scheme", "p-ftp", "ftp", "ftp://example.invalid/x.jpg",
         "fetch/unsupported_scheme", ""),
        ("gs_without_extra", "p-gs", "gs", "gs://no-such-bucket-xyz/x.jpg", gs_expected, ""),
        ("http_connection_refused", "p-http", "http", "http://127.0.0.1:9/x.jpg",
         "fetch/connection", ""),
        ("file_uri", "p-fileuri", "fileuri", "file://" + good_abs, EMBEDDED, "fileuri"),
        ("file_uri_missing", "p-fileuri2", "fileuri2", "file://" + good_abs + ".nope",
         "fetch/not_found", ""),
        ("unicode_emoji_id", "p-\u56fe\u7247", "\u56fe\u7247-\U0001F600-\u00e9", "img/good2.jpg",
         EMBEDDED, "\u56fe\u7247-\U0001F600-\u00e9"),
        ("very_long_id", "p-long", "x" * 5000, "img/good.jpg", "manifest/id_too_long", ""),
        ("duplicate_id_first", "p-dup-old", "dup", "img/good.jpg",
         "manifest/duplicate_image_id", ""),
        ("duplicate_id_second", "p-dup-new", "dup", "img/noise.png", EMBEDDED, "dup"),
        ("empty_product_id", "", "orphan", "img/good.jpg", "manifest/missing_product_id", ""),
        ("whitespace_product_id", "   ", "blank", "img/good.jpg",
         "manifest/missing_product_id", ""),
        ("empty_image_uri", "p-nouri", "nouri", "", "manifest/missing_image_uri", ""),
        ("whitespace_padded_id", "p-pad", "  padded  ", "img/good2.jpg", EMBEDDED, "padded"),
        # no URL path segment carries a '/' (issue 24 defect 6): refused with a reason
        ("id_with_path_chars", "p-slash", "../../a/b\\c", "img/good2.jpg",
         "manifest/unreachable_id", ""),
    ]
    csv_path = os.path.join(folder, "catalog.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["product_id", "image_id", "image_uri", "title"])
        line = 1
        for kind, pid, iid, uri, expected, emb in csv_rows:
            w.writerow([pid, iid, uri, f"title of {kind}"])
            line += 1
            kinds.append(RowKind(kind, expected, f"{csv_path}:{line}", emb))
        w.writerow(["p-extra", "extra", "img/good.jpg", "t", "one field too many"])
        line += 1
        kinds.append(RowKind("too_many_csv_fields", "manifest/invalid_row",
                             f"{csv_path}:{line}", ""))

    # ---- JSONL manifest: wrong-typed and null fields, broken lines
    jsonl_rows: list[tuple[str, str, str, str]] = [
        ("product_id_dict", json.dumps({"product_id": {"a": 1}, "image_uri": "img/good.jpg"}),
         "manifest/wrong_type", ""),
        ("product_id_list", json.dumps({"product_id": ["a"], "image_uri": "img/good.jpg"}),
         "manifest/wrong_type", ""),
        ("product_id_bool", json.dumps({"product_id": True, "image_uri": "img/good.jpg"}),
         "manifest/wrong_type", ""),
        ("product_id_float", json.dumps({"product_id": 1.5, "image_uri": "img/good.jpg"}),
         "manifest/wrong_type", ""),
        ("image_uri_list", json.dumps({"product_id": "p-j1", "image_uri": ["img/good.jpg"]}),
         "manifest/wrong_type", ""),
        ("title_dict", json.dumps({"product_id": "p-j2", "image_uri": "img/good.jpg",
                                   "title": {"nested": True}}), "manifest/wrong_type", ""),
        ("null_product_id", json.dumps({"product_id": None, "image_uri": "img/good.jpg"}),
         "manifest/missing_product_id", ""),
        ("null_image_uri", json.dumps({"product_id": "p-j3", "image_uri": None}),
         "manifest/missing_image_uri", ""),
        ("integer_product_id", json.dumps({"product_id": 12345, "image_uri": "img/good2.jpg"}),
         EMBEDDED, "12345"),
        ("nested_metadata_ok", json.dumps({"product_id": "p-j4", "image_id": "jmeta",
                                           "image_uri": "img/good2.jpg",
                                           "attrs": {"colour": ["red"], "n": 1}}),
         EMBEDDED, "jmeta"),
        ("nul_in_image_uri", json.dumps({"product_id": "p-j7", "image_uri": "img/go\u0000od.jpg"}),
         "manifest/invalid_characters", ""),
        ("control_chars_in_id", json.dumps({"product_id": "p-j8", "image_id": "a\nb\u0007",
                                            "image_uri": "img/good.jpg"}),
         "manifest/invalid_characters", ""),
        ("invalid_json_line", '{"product_id": "p-j5", "image_uri": ', "manifest/invalid_row", ""),
        ("json_array_line", json.dumps(["p-j6", "img/good.jpg"]), "manifest/invalid_row", ""),
        ("deeply_nested_json", "[" * 100_000 + "]" * 100_000, "manifest/invalid_row", ""),
    ]
    jsonl_path = os.path.join(folder, "catalog.jsonl")
    with open(jsonl_path, "w", encoding="utf-8") as fh:
        for n, (kind, text, expected, emb) in enumerate(jsonl_rows, 1):
            fh.write(text + "\n")
            kinds.append(RowKind(kind, expected, f"{jsonl_path}:{n}", emb))

    # ---- Parquet manifest: a binary image_id column, a binary metadata column
    parquet_path = os.path.join(folder, "catalog.parquet")
    table = pa.table({
        "product_id": pa.array(["p-q1", "p-q2", "p-q3"], pa.string()),
        "image_uri": pa.array([os.path.join(img, "good.jpg"), os.path.join(img, "good2.jpg"),
                               os.path.join(img, "good.jpg")], pa.string()),
        "image_id": pa.array([b"bin-id", None, None], pa.binary()),
        "blob": pa.array([None, None, b"\x00\x01binary"], pa.binary()),
    })
    pq.write_table(table, parquet_path)
    kinds += [RowKind("binary_image_id", "manifest/wrong_type", f"{parquet_path}:1", ""),
              RowKind("parquet_null_image_id", EMBEDDED, f"{parquet_path}:2", "p-q2"),
              RowKind("binary_metadata_column", "manifest/wrong_type", f"{parquet_path}:3", "")]
    return [csv_path, jsonl_path, parquet_path], kinds


def write_bad_manifests(folder: str) -> list[BadManifest]:
    """Wholly bad manifests under `folder` (and a few awkward valid ones, expected "ok")."""
    os.makedirs(folder, exist_ok=True)
    good = os.path.join(folder, "good.jpg")
    with open(good, "wb") as fh:
        fh.write(f.jpeg_bytes())
    out: list[BadManifest] = []

    def put(kind: str, name: str, data: bytes, expected: str) -> None:
        path = os.path.join(folder, name)
        with open(path, "wb") as fh:
            fh.write(data)
        out.append(BadManifest(kind, path, expected))

    row = b"p1,good.jpg\n"
    put("empty_file", "empty.csv", b"", "empty CSV")
    put("header_only", "header.csv", b"product_id,image_uri\n", "hold no rows")
    put("missing_required_columns", "cols.csv", b"sku,picture\np1,good.jpg\n",
        "lacks required column")
    put("binary_garbage", "garbage.csv", bytes(range(256)) * 8, "not UTF-8")
    put("wrong_extension", "catalog.txt", b"product_id,image_uri\n" + row,
        "unknown manifest format")
    put("no_extension", "catalog", b"product_id,image_uri\n" + row, "unknown manifest format")
    put("all_json_lines_invalid", "broken.jsonl", b"{not json\n[1,2\n", "no record can be parsed")
    put("jsonl_of_arrays", "arrays.jsonl", b'["p1", "good.jpg"]\n["p2", "good.jpg"]\n',
        "no record can be parsed")
    put("json_document_not_lines", "doc.json",
        json.dumps([{"product_id": "p1", "image_uri": "good.jpg"}], indent=2).encode(),
        "no record can be parsed")
    put("jsonl_without_required_fields", "other.jsonl", b'{"sku": 1}\n{"sku": 2}\n',
        "no record has the required fields")
    put("parquet_that_is_csv", "fake.parquet", b"product_id,image_uri\n" + row,
        "not a readable Parquet file")
    buf = io.BytesIO()
    pq.write_table(pa.table({"product_id": ["p1"], "image_uri": ["good.jpg"]}), buf)
    put("parquet_truncated", "trunc.parquet", buf.getvalue()[:-40], "not a readable Parquet file")
    buf = io.BytesIO()
    pq.write_table(pa.table({"sku": ["p1"], "picture": ["good.jpg"]}), buf)
    put("parquet_missing_columns", "cols.parquet", buf.getvalue(), "lacks required column")
    put("utf16_with_bom", "utf16.csv", "product_id,image_uri\np1,good.jpg\n".encode("utf-16"),
        "not UTF-8")
    put("latin1_not_utf8", "latin1.csv", "product_id,image_uri,title\np1,good.jpg,caf\u00e9\n"
        .encode("latin-1"), "not UTF-8")
    # A 300 KB CSV field no longer fails the file: its row is dead-lettered
    # manifest/too_large (issue 24 defect 4; test_locks_deadlines_limits_reasons.py).
    put("blank_lines_only", "blank.csv", b"\n\n\n", "empty CSV")
    directory = os.path.join(folder, "dir.csv")
    os.makedirs(directory, exist_ok=True)
    out.append(BadManifest("directory_instead_of_file", directory, "is a directory"))
    fifo = os.path.join(folder, "fifo.csv")
    os.mkfifo(fifo)
    out.append(BadManifest("fifo_instead_of_file", fifo, "not a regular file"))
    out.append(BadManifest("nonexistent_path", os.path.join(folder, "nope.csv"),
                           "does not exist"))
    out.append(BadManifest("glob_matching_nothing", os.path.join(folder, "none-*.csv"),
                           "does not exist"))
    out.append(BadManifest("unsupported_scheme", "ftp://example.invalid/m.csv",
                           "unsupported URI scheme"))
    # awkward but valid: must run
    put("utf8_bom", "bom.csv", b"\xef\xbb\xbfproduct_id,image_uri\n" + row, "ok")
    put("crlf_line_endings", "crlf.csv", b"product_id,image_uri\r\np1,good.jpg\r\n", "ok")
    put("quoted_newline_in_title", "quoted.csv",
        b'product_id,image_uri,title\np1,good.jpg,"two\nlines"\n', "ok")
    return out
