"""The catalog of the loaded index: "more like this" for a product or an image, and the
catalog images themselves (served only as the image type their bytes show)."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from serving.api.deadline import run_with_deadline
from serving.api.errors import ApiError, api_error, validated
from serving.api.schemas import ErrorResponse, SearchOptions, SearchResponse, error_responses
from serving.api.security import IMAGE_CSP
from serving.api.state import ServingState, State, run_search
from serving.errors import NotReadyError

log = logging.getLogger(__name__)

router = APIRouter(tags=["catalog"])

# Image types served from /v1/images, detected from the leading bytes (never the name).
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"),
                (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))
K = Annotated[int | None, Query(description="results wanted (default serving.default_k)")]
Filters = Annotated[str | None, Query(description='JSON object, e.g. {"category": "dairy"}')]
Collapse = Annotated[bool, Query(description="best image per product, or images")]
TextWeight = Annotated[str | None, Query(description="weight of title similarity, 0..1 "
                                                     "(default fusion.similar_text_weight)")]
GroupBy = Annotated[str | None, Query(description="crowding: a metadata field, e.g. brand "
                                                  "(product_id = images per product)")]
MaxPerGroup = Annotated[str | None, Query(description="crowding: results per group_by value "
                                                      "(default 1)")]


def sniff_image_type(data: bytes) -> str | None:
    """The media type of JPEG / PNG / GIF / WebP bytes, from their magic; None otherwise."""
    for magic, media in _IMAGE_MAGIC:
        if data.startswith(magic):
            return media
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


async def read_catalog_image(image_id: str, uri: str, state: ServingState) -> bytes:
    """The bytes of a catalog image, read as the pipeline reads them (pipelines.embed.fetch:
    local files only when regular -- a FIFO or device is refused without blocking -- at
    most fetch.max_bytes), within serving.image_read_timeout_s; 404 image_unavailable
    otherwise. The deadline also holds for reads that block inside the filesystem: the
    answer does not wait for them."""
    from pipelines.embed.fetch import fetch_bytes
    timeout = state.config.serving.image_read_timeout_s
    cfg = dataclasses.replace(state.config.fetch, deadline_s=timeout)
    try:  # own daemon threads: a stuck read holds neither the search threads nor exit
        return await run_with_deadline(fetch_bytes, uri, cfg, timeout_s=timeout)
    except ApiError:  # every reader thread is stuck: 503 busy
        raise
    except Exception as e:  # FetchError, DeadlineExceeded, anything the storage raises
        log.warning("image %s: cannot read %s: %s", image_id, uri, e)
        raise ApiError(404, "image_unavailable",
                       "this catalog image cannot be read from storage") from None


def _options(state: ServingState, **given: Any) -> SearchOptions:
    """The query string's values, validated by the request model (k and collapse are
    already typed by their Query declarations)."""
    return validated(SearchOptions, {name: value for name, value in given.items()
                                     if value is not None}, state.json_context())


@router.get("/v1/products/{product_id}/similar", summary='"More like this" for a product',
            response_model=SearchResponse, response_model_exclude_none=True,
            responses=error_responses(404, 413, 422, 503))
async def similar_product(product_id: str, state: State, k: K = None,
                          filters: Filters = None, collapse: Collapse = True,
                          text_weight: TextWeight = None, group_by: GroupBy = None,
                          max_per_group: MaxPerGroup = None) -> SearchResponse:
    o = _options(state, filters=filters, text_weight=text_weight, group_by=group_by,
                 max_per_group=max_per_group)
    results = await run_search(state.searcher.similar_to, product_id=product_id, k=k,
                               filters=o.filters, collapse=collapse, text_weight=o.text_weight,
                               group_by=o.group_by, max_per_group=o.max_per_group)
    return SearchResponse.from_results(results)


@router.get("/v1/images/{image_id:path}/similar", summary='"More like this" for a catalog image',
            response_model=SearchResponse, response_model_exclude_none=True,
            responses=error_responses(404, 413, 422, 503))
async def similar_image(image_id: str, state: State, k: K = None, filters: Filters = None,
                        collapse: Collapse = True, group_by: GroupBy = None,
                        max_per_group: MaxPerGroup = None) -> SearchResponse:
    o = _options(state, filters=filters, group_by=group_by, max_per_group=max_per_group)
    results = await run_search(state.searcher.similar_to, image_id=image_id, k=k,
                               filters=o.filters, collapse=collapse,
                               group_by=o.group_by, max_per_group=o.max_per_group)
    return SearchResponse.from_results(results)


@router.get("/v1/images/{image_id:path}", summary="A catalog image of the loaded index",
            response_class=Response,
            responses={200: {"description": "the image's bytes",
                             "content": {m: {} for m in ("image/jpeg", "image/png",
                                                         "image/gif", "image/webp")}},
                       **error_responses(404, 503),
                       422: {"model": ErrorResponse, "description": "malformed request"}})
async def image(image_id: str, state: State) -> Response:
    """The image's bytes, as the type they show (JPEG/PNG/GIF/WebP), never guessed from a
    name. Catalog images at http(s) URLs are not fetched by the server: search results
    give their URL as image_url for the client to load (404 reason remote_image here)."""
    try:
        idx = state.searcher.current
    except NotReadyError as e:
        raise api_error(e) from None
    uri = idx.image_uri(image_id)
    if uri is None:
        raise ApiError(404, "unknown_image", f"image {json.dumps(image_id)[:200]} is not in "
                                             f"index version {idx.version}")
    if uri[:8].lower().startswith(("http://", "https://")):
        raise ApiError(404, "remote_image",
                       "this catalog image is hosted at an http(s) URL, which the server "
                       "does not fetch; search results give that URL as image_url")
    data = await read_catalog_image(image_id, uri, state)
    media = sniff_image_type(data[:16])
    if media is None:
        log.warning("image %s: %s is not a JPEG/PNG/GIF/WebP file: not served", image_id, uri)
        raise ApiError(404, "unsupported_image_type",
                       "this catalog file is not a JPEG, PNG, GIF or WebP image and is not "
                       "served")
    return Response(data, media_type=media,
                    headers={"cache-control": "public, max-age=3600",
                             "content-security-policy": IMAGE_CSP,
                             "content-disposition": "inline"})
