"""Feature variants: how one image (or one augmentation view of it) becomes ONE vector.

A view is embedded as the L2-normalised mean of its *variants*: every zoom level in
`features.scales` (1.0 = the plain center crop / letterbox of pipelines.model.image_decode;
s > 1 = the image resized s times larger and center-cropped at the model's size, i.e. the
model sees the middle 1/s of the usual crop at s times the detail), each also mirrored
when `features.flip` is on. The catalog (embed job) and the queries (serving, evaluate)
go through the same functions, and the settings are part of the embedding fingerprint
and of the index manifest, so serving always applies what the catalog got.

With plain settings (scales [1.0], flip off, no query_scales; what an index manifest
without a "features" record means) a view has one variant and the arrays and vectors are
exactly those of pipelines.model.image_decode.preprocess. The shipped defaults are the plain
settings: the grocery grid's zoom (scales [1.3], query_scales [1.6]) does not
transfer to other domains (docs/EVALUATION.md, "Feature defaults").
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from pipelines.model.image_decode import augment_view, preprocess

if TYPE_CHECKING:
    from pipelines.core.config import FeaturesConfig

PLAIN_FEATURES: dict[str, Any] = {"scales": [1.0], "flip": False}


def features_dict(features: "FeaturesConfig | Mapping[str, Any] | None") -> dict[str, Any]:
    """The plain, canonical form recorded in snapshots and manifests ({"scales", "flip"})."""
    if features is None:
        return dict(PLAIN_FEATURES)
    if isinstance(features, Mapping):
        scales = features.get("scales", PLAIN_FEATURES["scales"])
        flip = features.get("flip", False)
        query_scales = features.get("query_scales")
    else:
        scales, flip, query_scales = features.scales, features.flip, features.query_scales
    out: dict[str, Any] = {"scales": [float(s) for s in scales], "flip": bool(flip)}
    if query_scales is not None:
        out["query_scales"] = [float(s) for s in query_scales]
    return out


def query_features(features: "FeaturesConfig | Mapping[str, Any] | None") -> dict[str, Any]:
    """The variants a query photo gets: the catalog's, with query_scales when set."""
    f = features_dict(features)
    return {"scales": f.get("query_scales", f["scales"]), "flip": f["flip"]}


def is_plain(features: "FeaturesConfig | Mapping[str, Any] | None") -> bool:
    """True for one plain variant per view (scales [1.0], no flip, queries alike)."""
    return features_dict(features) == PLAIN_FEATURES


def _zoom(img: Image.Image, scale: float) -> Image.Image:
    """The middle 1/scale of the image (so preprocess shows it `scale` times larger)."""
    if scale == 1.0:
        return img
    w, h = img.size
    cw, ch = max(1, int(round(w / scale))), max(1, int(round(h / scale)))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def variant_arrays(img: Image.Image, size: int, resize: str,
                   features: "FeaturesConfig | Mapping[str, Any] | None") -> np.ndarray:
    """uint8 [size, size, 3] when there is one variant, else uint8 [V, size, size, 3]."""
    f = features_dict(features)
    arrays = []
    for scale in f["scales"]:
        arr = preprocess(_zoom(img, scale), size, resize)
        arrays.append(arr)
        if f["flip"]:
            arrays.append(np.ascontiguousarray(arr[:, ::-1, :]))
    return arrays[0] if len(arrays) == 1 else np.stack(arrays)


def preprocess_feature_views(img: Image.Image, views: Sequence[str], *, size: int, resize: str,
                             image_id: str, seed: int,
                             features: "FeaturesConfig | Mapping[str, Any] | None"
                             ) -> list[tuple[str, np.ndarray]]:
    """[(view name, model input)] per augmentation view; see `variant_arrays` for the shape."""
    return [(v, variant_arrays(augment_view(img, v, image_id=image_id, seed=seed), size, resize,
                               features))
            for v in views]


def embed_variants(embed: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """float32 [N, dim] from uint8 [N,S,S,3] (plain) or [N,V,S,S,3] (variants averaged)."""
    if images.ndim == 4:
        return embed(images)
    if images.ndim != 5:
        raise ValueError(f"expected uint8 [N,S,S,3] or [N,V,S,S,3] images, got {images.shape}")
    n, v = images.shape[:2]
    flat = embed(images.reshape((n * v,) + images.shape[2:]))
    mean = flat.reshape(n, v, -1).mean(axis=1)
    norms = np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return (mean / norms).astype(np.float32)


def load_query_arrays(data: bytes, size: int, config: Any,
                      features: "FeaturesConfig | Mapping[str, Any] | None", *,
                      max_decoded_pixels: int | None = None,
                      formats: Sequence[str] | None = None) -> np.ndarray:
    """Photo bytes -> model input exactly as the catalog's 'original' view got it (serving).

    Same decode as pipelines.model.image_decode.load_and_preprocess (uploads pass the tighter
    `max_decoded_pixels` and `formats`, see decode_image); raises its DecodeError.
    """
    from pipelines.model.image_decode import decode_image
    img = decode_image(data, max_pixels=config.decode.max_pixels, target_size=size,
                       max_bytes=config.fetch.max_bytes, max_decoded_pixels=max_decoded_pixels,
                       formats=formats)
    return variant_arrays(img, size, config.decode.resize, query_features(features))
