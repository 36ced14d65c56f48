"""The OpenAPI schema and the answers agree (issue 24 defect 8).

The slow test runs schemathesis's property checks over real HTTP: the service on a loopback
port (serving_fixtures.LiveServer over a private copy of the serving world's index, feedback
on, no admin token, so every route runs its real code), its own schema loaded from
/openapi.json, every operation fuzzed with schema-valid (positive) and schema-invalid
(negative) requests. Checks: schemathesis's defaults (no 5xx, status codes, content types,
headers and bodies as documented -- the error shape included -- negative data refused), with
positive_data_acceptance replaced by `_check_positive`: schema-valid data is accepted, or
refused only for a reason the schema cannot state because it depends on the serving index
(DATA_DEPENDENT). Bounded: MAX_EXAMPLES per operation and mode, no shrinking, at most
OPERATION_BUDGET_S of requests per operation and mode, derandomized (the same examples every
run; unseeded runs still find multipart edge cases, see docs/RELIABILITY.md).

    .venv/bin/python -m pytest -m slow tests/reliability/test_schema_conformance.py

Exploring beyond the fixed examples (not for CI): FUZZ_RANDOM=1 (unseeded), FUZZ_ONLY=TEXT
(only operations whose label contains TEXT), FUZZ_EXAMPLES=N and FUZZ_BUDGET_S=S.

The fast tests check the schema's statements one by one (each a fix this test found).
"""
from __future__ import annotations

import os
import time

import pytest

from serving_fixtures import LiveServer, copy_index, jpeg_bytes, serving_world

MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 50))
OPERATION_BUDGET_S = float(os.environ.get("FUZZ_BUDGET_S", 6.0))
REQUEST_TIMEOUT_S = 30.0
# 422 reasons a schema-valid request may get, with what the message says: the value is well
# formed but the serving index does not hold it (fields, products) or it is not an image.
DATA_DEPENDENT = {
    "bad_filter": "is not a metadata field of this index",
    "bad_group_by": "is not a metadata field of this index",
    "bad_vector": ("numbers, got shape", "all zeros", "NaN or infinite"),
    "unknown_product": "is not in index version",
}
# decode failures of a schema-valid `image` (any bytes): pipelines.model.image_decode
_IMAGE_REASONS = {"not_an_image", "empty", "truncated", "corrupt", "too_many_pixels"}


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    from serving.app import create_app
    world = serving_world()
    base = tmp_path_factory.mktemp("schema-conformance")
    root = copy_index(world, str(base / "index"))
    config = world.config.replace(serving={"feedback_root": str(base / "feedback")})
    with LiveServer(create_app(root, config, watch=False)) as live:
        yield live, world, config


def _check_positive(case, response) -> str | None:
    """Why a schema-valid request's answer is wrong, or None."""
    if response.status_code < 400 or response.status_code in (401, 403, 404, 409, 429):
        return None
    if response.status_code != 422:
        return f"schema-valid request answered {response.status_code}"
    reason = response.json()["error"]["reason"]
    message = response.json()["error"]["message"]
    if reason in _IMAGE_REASONS:
        return None
    expected = DATA_DEPENDENT.get(reason)
    hints = (expected,) if isinstance(expected, str) else expected or ()
    if any(h in message for h in hints):
        return None
    return f"schema-valid request refused: 422 {reason}: {message[:300]}"


def _null_form_field(case) -> bool:
    """A negative multipart case whose mutation is a null field: schemathesis sends no such
    field at all, so the request it calls schema-violating is a valid one (an optional
    field left out) and is rightly accepted."""
    body = case.body
    return (str(case.media_type or "").startswith("multipart/") and isinstance(body, dict)
            and any(value is None for value in body.values()))


def _fuzz(op, mode, session, failures: list[str]) -> int:
    """Run one operation in one generation mode; returns how many requests were sent."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    label = f"{op.label} [{mode.value}]"
    stop = time.monotonic() + OPERATION_BUDGET_S
    count = [0]

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=not os.environ.get('FUZZ_RANDOM'),
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        if time.monotonic() > stop:
            return  # this operation's budget is spent
        if mode == GenerationMode.NEGATIVE and _null_form_field(case):
            return  # a form has no null: the field is sent as absent, a valid request
        count[0] += 1
        response = case.call(session=session, timeout=REQUEST_TIMEOUT_S)
        try:
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        except (AssertionError, BaseExceptionGroup) as e:
            failures.append(f"{label}: {e}"[:3000])
        if mode == GenerationMode.POSITIVE:
            why = _check_positive(case, response)
            if why:
                failures.append(f"{label}: {why}\n{case.as_curl_command()}"[:3000])

    try:
        run()
    except Unsatisfiable:  # nothing to negate (no parameters, or strings only)
        assert mode == GenerationMode.NEGATIVE, label
    return count[0]


@pytest.mark.slow
def test_every_operation_answers_as_its_schema_says(live_api):
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    live, _, _ = live_api
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json", timeout=30)
    # a body past its byte limit is refused 413 (documented), not 4xx-by-schema
    negative = schema.config.checks.negative_data_rejection
    negative.expected_statuses = [*negative.expected_statuses, "413"]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    failures: list[str] = []
    ran: dict[str, int] = {}
    session = requests.Session()
    started = time.monotonic()
    only = os.environ.get('FUZZ_ONLY')
    for op in operations:
        if only and only not in op.label:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            ran[f"{op.label} [{mode.value}]"] = _fuzz(op, mode, session, failures)
    elapsed = time.monotonic() - started
    positive = {label: n for label, n in ran.items() if label.endswith("[positive]")}
    assert only or all(positive.values()), positive  # every operation was called
    assert not failures, "\n\n".join(failures[:12]) + f"\n({len(failures)} failures; ran {ran})"
    print(f"schemathesis: {sum(ran.values())} requests over {len(operations)} operations "
          f"in {elapsed:.0f} s: {ran}")


# --------------------------------------------------------------------------- fast checks

@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    """The OpenAPI document of an app over an empty index root (no index needed for it)."""
    from pipelines.core.config import load_config
    from serving.app import create_app
    config = load_config(overrides={"serving": {"max_k": 50}, "fusion": {"max_text_chars": 300}})
    root = str(tmp_path_factory.mktemp("empty-index"))
    return create_app(root, config, watch=False).openapi()


def _params(doc, path: str, method: str = "get") -> dict:
    return {p["name"]: p for p in doc["paths"][path][method]["parameters"]}


def test_query_parameters_state_their_bounds_and_filters_is_json(doc):
    """Before: max_per_group and text_weight were documented as any string, filters as a
    string (schemathesis: schema-valid requests refused 422)."""
    for path in ("/v1/products/{product_id}/similar", "/v1/images/{image_id}/similar"):
        params = _params(doc, path)
        assert params["k"]["schema"]["type"] == "integer"
        assert (params["k"]["schema"]["minimum"], params["k"]["schema"]["maximum"]) == (1, 50)
        mpg = params["max_per_group"]["schema"]
        assert (mpg["type"], mpg["minimum"], mpg["maximum"]) == ("integer", 1, 50)
        assert "schema" not in params["filters"]
        filters = params["filters"]["content"]["application/json"]["schema"]
        assert filters["type"] == "object" and filters["maxProperties"] == 16
        assert params["group_by"]["schema"]["minLength"] == 1
    tw = _params(doc, "/v1/products/{product_id}/similar")["text_weight"]["schema"]
    assert (tw["type"], tw["minimum"], tw["maximum"]) == ("number", 0, 1)


def test_search_bodies_say_what_they_need(doc):
    """Before: a multipart body without image and text, or a JSON body without vector and
    text, was schema-valid and refused (missing_image / bad_vector)."""
    content = doc["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    form, body = (content[m]["schema"] for m in ("multipart/form-data", "application/json"))
    assert [a["required"] for a in form["anyOf"]] == [["image"], ["text"]]
    assert [a["required"] for a in body["anyOf"]] == [["vector"], ["text"]]
    assert content["multipart/form-data"]["encoding"]["filters"]["contentType"] == \
        "application/json"
    assert form["properties"]["text"]["maxLength"] == 300
    assert form["properties"]["k"]["maximum"] == 50  # a form has no null
    assert body["properties"]["vector"]["items"]["maximum"] < 3.5e38


def test_admin_delete_documents_its_body_and_not_local(doc):
    """Before: POST /v1/admin/delete had no documented body (an empty body was schema-valid
    and refused bad_json) and no 409."""
    op = doc["paths"]["/v1/admin/delete"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert op["requestBody"]["required"] is True
    assert set(schema["properties"]) == {"product_ids", "image_ids", "reason"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["image_ids"]["maxItems"] == 10_000
    assert "409" in op["responses"]
    # the service strips Python's whitespace, U+0085 included (schemathesis: "\x85" was
    # schema-valid and refused bad_delete)
    import re
    pattern = re.compile(schema["properties"]["product_ids"]["items"]["pattern"])
    assert not pattern.search("\x85") and pattern.search("\x85a") and not pattern.search("a\x01")


def test_repeated_ids_count_against_the_delete_limit():
    """Before: 10,001 copies of one id passed (repeats were dropped before counting), which
    the schema's maxItems refuses (schemathesis: schema-violating request accepted)."""
    from pipelines.index import deltas as dl
    from pipelines.index.delete import MAX_IDS, check_ids
    assert check_ids(["a"] * MAX_IDS, []) == (["a"], [])
    with pytest.raises(dl.DeltaError, match="at most"):
        check_ids(["a"] * (MAX_IDS + 1), [])
    with pytest.raises(dl.DeltaError, match="at most"):
        check_ids(["a"] * MAX_IDS, ["p"])


def world_vector(world) -> list[float]:
    from pipelines.embed import snapshot
    return snapshot.load(world.snapshot).vectors()[0].tolist()


def test_answers_agree_with_the_stated_bounds(live_api):
    """The statements above, over real HTTP: values at a bound answer 200, past it 422 in
    the error shape; a filters JSON object in the query string is read as one."""
    import json

    import httpx
    live, world, config = live_api
    max_k = config.serving.max_k
    product = world.catalog_rows()[0]["product_id"]
    path = f"/v1/products/{product}/similar"
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for params, ok in (({"max_per_group": 1}, True), ({"max_per_group": max_k}, True),
                           ({"max_per_group": 0}, False), ({"max_per_group": max_k + 1}, False),
                           ({"text_weight": 0}, True), ({"text_weight": 1}, True),
                           ({"text_weight": 1.5}, False),
                           ({"filters": json.dumps({"product_id": [product]})}, True),
                           ({"filters": "[1]"}, False), ({"group_by": " "}, False)):
            r = c.get(path, params=params)
            assert (r.status_code == 200) == ok, (params, r.status_code, r.text)
            if not ok:
                assert r.status_code == 422 and set(r.json()) == {"error"}, r.text
        vector = [1.0] * len(world_vector(world))
        for body, ok in (({"k": 3.0, "max_per_group": 2.0}, True), ({"k": 2.5}, False),
                         ({"max_per_group": 1.5}, False)):
            # JSON Schema's integers include 3.0 (before: refused bad_k / bad_max_per_group)
            r = c.post("/v1/search", json={"vector": vector, **body})
            assert (r.status_code == 200) == ok, (body, r.status_code, r.text)
        # text_weight is refused out of [0, 1] where it is unused too (before: text-only
        # form searches accepted -1)
        r = c.post("/v1/search", files={"text": (None, "milk"), "text_weight": (None, "-1")})
        assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_text_weight"
        r = c.post("/v1/search", json={"text": "milk", "text_weight": 2})
        assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_text_weight"
        r = c.post("/v1/search", files={"k": (None, "3")})
        assert r.status_code == 422 and r.json()["error"]["reason"] == "missing_image"
        r = c.post("/v1/search", files={"image": ("q.jpg", jpeg_bytes(), "image/jpeg"),
                                        "filters": (None, json.dumps({"product_id": product}),
                                                    "application/json")})
        assert r.status_code == 200, r.text
        r = c.post("/v1/admin/delete", json={"image_ids": ["x"] * 10_001})
        assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_delete", r.text


def test_json_empty_strings_are_refused_as_the_schema_says(live_api):
    """Before: {"group_by": "", "text": "0"} was accepted ("" read as "not given", a form's
    convention), though the schema's group_by has minLength 1 (schemathesis: schema-violating
    request accepted). In JSON an empty string is refused with the field's reason; an empty
    form field still means "not given"."""
    import httpx
    live, world, _ = live_api
    vector = [1.0] * len(world_vector(world))
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for name, reason in (("group_by", "bad_group_by"), ("max_per_group", "bad_max_per_group"),
                             ("k", "bad_k"), ("text_weight", "bad_text_weight"),
                             ("filters", "bad_filter"), ("collapse", "bad_collapse")):
            r = c.post("/v1/search", json={"text": "0", name: ""})
            assert r.status_code == 422, (name, r.text)
            assert r.json()["error"]["reason"] == reason and name in r.json()["error"]["message"]
            r = c.post("/v1/search", json={"vector": vector, name: ""})
            assert r.status_code == 422 and r.json()["error"]["reason"] == reason, r.text
        r = c.post("/v1/search", files={"image": ("q.jpg", jpeg_bytes(), "image/jpeg"),
                                        "group_by": (None, ""), "k": (None, "")})
        assert r.status_code == 200, r.text


def test_a_repeated_form_field_is_refused(live_api):
    """Before: a multipart search with `k` sent twice (schemathesis: k became an array) was
    answered with one of the values; the schema gives each field one value."""
    import httpx
    live, _, _ = live_api
    photo = ("q.jpg", jpeg_bytes(), "image/jpeg")
    with httpx.Client(base_url=live.url, timeout=30) as c:
        r = c.post("/v1/search", files=[("image", photo), ("k", (None, "3")), ("k", (None, "4"))])
        assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_k", r.text
        assert "'k' is sent 2 times" in r.json()["error"]["message"]
        r = c.post("/v1/search", files=[("image", photo), ("image", photo)])
        assert r.status_code == 422, r.text
        r = c.post("/v1/search", files=[("image", photo), ("k", (None, "3"))])
        assert r.status_code == 200, r.text


def test_admin_routes_state_their_bearer_token(tmp_path):
    """The admin routes name the bearer scheme; without an admin token the server takes
    them without one, so the schema says the token is optional there ({})."""
    from pipelines.core.config import load_config
    from serving.app import create_app
    for token, security in ((None, [{"adminToken": []}, {}]),
                            ("t" * 20, [{"adminToken": []}])):
        doc = create_app(str(tmp_path), load_config(), watch=False,
                         admin_token=token).openapi()
        assert doc["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
        for path in ("/v1/reload", "/v1/admin/delete"):
            assert doc["paths"][path]["post"]["security"] == security, (token, path)
        assert "security" not in doc["paths"]["/v1/search"]["post"]


def test_nested_query_string_filters_are_refused_in_the_error_shape(live_api):
    """An unseeded run once flagged a deeply nested `filters` in the query string of
    GET /v1/images/{id}/similar (the failure's text was not kept). Every nesting depth, as
    an array or as a filter's value, for a known and an unknown image, is answered 422 in the
    documented error shape: bad_filter up to the nesting limit, too_deep past it."""
    import httpx
    live, world, config = live_api
    image = world.catalog_rows()[0]["image_id"]
    limit = config.serving.max_json_depth
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for image_id in (image, "no-such-image"):
            for depth in (1, 2, limit - 1, limit, limit + 1, 100, 5000):
                nested = "[" * depth + "1" + "]" * depth
                cases = [(nested, depth)]
                if depth > 1:  # {"product_id": [1]} is a valid filter
                    cases.append(('{"product_id": ' + nested + "}", depth + 1))
                for filters, inner in cases:
                    r = c.get(f"/v1/images/{image_id}/similar", params={"filters": filters})
                    assert r.status_code == 422, (image_id, depth, r.status_code, r.text)
                    assert r.headers["content-type"] == "application/json"
                    error = r.json()["error"]
                    assert error["reason"] == ("too_deep" if inner > limit else "bad_filter"), (
                        image_id, depth, error)


def test_blank_patterns_are_pythons_whitespace(doc, live_api):
    """Before: group_by = U+0085 alone matched the schema's `\\S` (ECMA whitespace lacks
    U+0085 and U+001C-U+001F) and was refused bad_group_by, because the service strips
    Python's whitespace (schemathesis, unseeded). The not-blank patterns of text, group_by,
    the delete reason and ids now name Python's whitespace; each such character alone is
    schema-invalid and refused 422, and U+FEFF (ECMA whitespace, not Python's) is a value."""
    import re
    import sys

    import httpx
    spaces = [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()]
    params = _params(doc, "/v1/images/{image_id}/similar")
    delete = doc["paths"]["/v1/admin/delete"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]
    form = doc["paths"]["/v1/search"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    patterns = {"group_by": params["group_by"]["schema"]["pattern"],
                "text": form["text"]["pattern"], "reason": delete["reason"]["pattern"],
                "ids": delete["image_ids"]["items"]["pattern"]}
    for name, pattern in patterns.items():
        assert not [hex(ord(c)) for c in spaces if re.search(pattern, c)], name
        assert re.search(pattern, "\ufeff") and re.search(pattern, " a "), name
    live, world, _ = live_api
    image = world.catalog_rows()[0]["image_id"]
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for space in ("\x85", "\x1c", "\u3000"):
            r = c.get(f"/v1/images/{image}/similar", params={"group_by": space})
            assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_group_by", r.text
            r = c.post("/v1/search", json={"text": space + space})
            assert r.status_code == 422 and r.json()["error"]["reason"] == "bad_text", r.text
