"""The OpenAPI schema states what the service enforces (checked by
tests/reliability/test_schema_conformance.py with schemathesis): FastAPI builds the schema
from the routes' declarations, which keep the service's own parsing (serving.api.parsing:
query values arrive as strings and are refused with their reason); this module writes the
limits those parsers and serving.query apply into it, from the app's config:

- `k` and `max_per_group` (query parameters, form fields, JSON properties) are integers in
  1..serving.max_k; `text_weight` a number in 0..1; `text` 1..fusion.max_text_chars
  characters with one that is not whitespace; `group_by` a non-blank field name;
- `filters` an object of at most 16 keys, each one value or 1..100 values (strings, numbers,
  booleans); as a query parameter it is that object as JSON (`content: application/json`);
- `vector` an array of numbers within float32's range; the JSON search body needs `vector`
  or `text`, the multipart one `image` or `text`;
- POST /v1/admin/delete's body (read by the route itself, so FastAPI did not document it)
  and its 409 `not_local`;
- the admin routes' bearer token (the scheme FastAPI writes for serving.api.state's
  HTTPBearer) is optional (`{}` among their security requirements) on a server without an
  admin token, where they take requests without one.

What the schema cannot say depends on the serving index and is answered 422 with its reason
(docs/RELIABILITY.md): a filter key or group_by field that is not a metadata field of the
index, a vector of another dimension or all zeros, bytes that are not an image, feedback for
a product the index does not hold.
"""
from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from pipelines.core.config import Config
from pipelines.index.delete import MAX_ID_CHARS as _MAX_ID_CHARS
from pipelines.index.delete import MAX_IDS as _MAX_IDS
from serving.filters import MAX_FILTER_KEYS, MAX_FILTER_VALUES

_FLOAT32_MAX = 3.4028234663852886e38
# Python's whitespace (str.isspace, what str.strip removes), spelled out: ECMA's \s, which
# JSON Schema patterns use, lacks U+001C-U+001F and U+0085 and adds U+FEFF.
PY_WHITESPACE = r"\t-\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Not only whitespace (query text and field names are stripped before use).
_NOT_BLANK = f"[^{PY_WHITESPACE}]"


def filters_schema() -> dict[str, Any]:
    scalar = {"type": ["string", "number", "boolean"]}
    return {"type": "object", "maxProperties": MAX_FILTER_KEYS,
            "propertyNames": {"minLength": 1},
            "additionalProperties": {"anyOf": [
                scalar, {"type": "array", "items": scalar, "minItems": 1,
                         "maxItems": MAX_FILTER_VALUES}]}}


def delete_body_schema() -> dict[str, Any]:
    ids = {"type": "array", "maxItems": _MAX_IDS, "items": {
        "type": "string", "minLength": 1, "maxLength": _MAX_ID_CHARS,
        # printable (no control character) and not only Python's whitespace (stripped)
        "pattern": rf"^[^\u0000-\u001f]*[^\u0000-\u001f{PY_WHITESPACE}][^\u0000-\u001f]*$"}}
    return {"type": "object", "additionalProperties": False,
            "properties": {"product_ids": ids, "image_ids": ids,
                           "reason": {"type": "string", "minLength": 1, "maxLength": 500,
                                      "pattern": _NOT_BLANK, "default": "takedown"}},
            "anyOf": [{"required": ["product_ids"],
                       "properties": {"product_ids": {"minItems": 1}}},
                      {"required": ["image_ids"],
                       "properties": {"image_ids": {"minItems": 1}}}],
            "description": f"ids to take down (at most {_MAX_IDS} in all) and why"}


def _field_schemas(config: Config) -> dict[str, dict[str, Any]]:
    max_k = config.serving.max_k
    return {
        "k": {"type": "integer", "minimum": 1, "maximum": max_k},
        "max_per_group": {"type": "integer", "minimum": 1, "maximum": max_k},
        "text_weight": {"type": "number", "minimum": 0, "maximum": 1},
        "text": {"type": "string", "minLength": 1,
                 "maxLength": config.fusion.max_text_chars, "pattern": _NOT_BLANK},
        "group_by": {"type": "string", "minLength": 1, "pattern": _NOT_BLANK},
        "filters": filters_schema(),
    }


def _replace(schema: dict[str, Any], new: dict[str, Any], nullable: bool) -> None:
    """`schema` (a property or parameter schema) becomes `new` (or null when `nullable`),
    keeping its title, description and default."""
    kept: dict[str, Any] = {k: schema[k] for k in ("title", "description", "default")
                            if k in schema}
    schema.clear()
    if nullable:
        schema["anyOf"] = [copy.deepcopy(new), {"type": "null"}]
    else:
        schema.update(copy.deepcopy(new))
    schema.update(kept)


def document_limits(doc: dict[str, Any], config: Config) -> dict[str, Any]:
    """`doc` (FastAPI's OpenAPI document) with the enforced limits written in; returns it."""
    fields = _field_schemas(config)
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            for param in op.get("parameters", []):
                name = param.get("name")
                if param.get("in") != "query" or name not in fields:
                    continue
                if name == "filters":  # a JSON object in the query string
                    schema = param.pop("schema", {})
                    param["content"] = {"application/json": {"schema": {
                        **copy.deepcopy(fields["filters"]),
                        "description": schema.get("description", "")}}}
                else:
                    _replace(param.setdefault("schema", {}), fields[name], nullable=False)
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                schema = content.get("schema", {})
                form = media == "multipart/form-data"
                for name, prop in schema.get("properties", {}).items():
                    if name in fields:  # JSON null = absent; a form has no null
                        _replace(prop, fields[name], nullable=not form)
                if path != "/v1/search":
                    continue
                text = {"required": ["text"], "properties": {"text": fields["text"]}}
                if form:
                    schema["anyOf"] = [{"required": ["image"]}, text]
                    schema["properties"]["image"] = {
                        "type": "string", "format": "binary",
                        "description": schema["properties"]["image"].get("description", "")}
                    # a form field is text: filters is the object as JSON
                    content["encoding"] = {"filters": {"contentType": "application/json"}}
                else:
                    schema["properties"]["vector"]["items"] = {
                        "type": "number", "minimum": -_FLOAT32_MAX, "maximum": _FLOAT32_MAX}
                    schema["anyOf"] = [{"required": ["vector"]}, text]
            if path == "/v1/admin/delete" and method == "post":
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": delete_body_schema()}}}
                op.setdefault("responses", {})["409"] = {
                    "description": "takedowns need a local index root (not_local)",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    # answers echo the checked values
    answer = doc.get("components", {}).get("schemas", {}).get("SearchResponse", {})
    for name in ("k", "max_per_group"):
        prop = answer.get("properties", {}).get(name)
        if prop is not None:
            _replace(prop, fields[name], nullable="anyOf" in prop)
    return doc


def optional_auth(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with every operation's security requirements also met by no credentials."""
    for operations in doc.get("paths", {}).values():
        for op in operations.values():
            if op.get("security") and {} not in op["security"]:
                op["security"].append({})
    return doc


def install(app: FastAPI, config: Config, *, admin_token: bool) -> None:
    """app.openapi() returns the document with the limits (built once, like FastAPI's);
    admin_token: whether the server has one (else the admin routes' auth is optional)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = document_limits(build(), config)
            app.openapi_schema = doc if admin_token else optional_auth(doc)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
