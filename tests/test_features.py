"""Feature variants (pipelines.model.features): config validation, shapes, the embedding
fingerprint (changing an option re-embeds, unchanged reuses) with the real Beam embed job,
and serving applying the index's own feature settings to query photos."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.embed import snapshot
from pipelines.core.config import ConfigError, load_config
from pipelines.embed.job import embedding_fingerprint, run_embed
from pipelines.model.features import embed_variants, variant_arrays
from pipelines.model.resolve import resolve_model
from pipelines.embed.sample_catalog import write_catalog


def test_bad_feature_config_fails_naming_the_key():
    for bad, key in (({"scales": [0.5]}, "features.scales"), ({"scales": []}, "features.scales"),
                     ({"scales": [1.0, 1.0]}, "features.scales"),
                     ({"flip": "yes"}, "features.flip"), ({"zoom": 2}, "features.zoom")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides={"features": bad})
    with pytest.raises(ConfigError, match=r"fusion\.text_weight"):
        load_config(overrides={"fusion": {"text_weight": 1.5}})


def test_variants_default_is_the_plain_preprocess_and_flip_mirrors():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8))
    from pipelines.model.image_decode import preprocess
    plain = variant_arrays(img, 64, "center_crop", None)
    assert plain.shape == (64, 64, 3) and np.array_equal(plain, preprocess(img, 64))
    both = variant_arrays(img, 64, "center_crop", {"scales": [1.0, 1.5], "flip": True})
    assert both.shape == (4, 64, 64, 3)
    assert np.array_equal(both[0], plain) and np.array_equal(both[1], plain[:, ::-1])
    assert not np.array_equal(both[2], plain)  # the zoomed-in variant differs

    def embed(x: np.ndarray) -> np.ndarray:  # a real (linear) function of the pixels
        v = x.reshape(len(x), -1)[:, :8].astype(np.float32) + 1
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    out = embed_variants(embed, both[None])
    expected = embed(both).mean(axis=0)
    assert np.allclose(out[0], expected / np.linalg.norm(expected), atol=1e-6)
    assert np.allclose(embed_variants(embed, plain[None]), embed(plain[None]))


def test_query_scales_change_only_the_query_variants():
    from pipelines.model.features import features_dict, query_features
    f = {"scales": [1.0], "flip": True, "query_scales": [1.0, 1.3]}
    assert features_dict(f) == f and query_features(f) == {"scales": [1.0, 1.3], "flip": True}
    assert query_features({"scales": [1.2]}) == {"scales": [1.2], "flip": False}
    assert "query_scales" not in features_dict({"scales": [1.0]})
    with pytest.raises(ConfigError, match=r"features\.query_scales"):
        load_config(overrides={"features": {"query_scales": [3.0]}})


PLAIN = {"scales": [1.0], "flip": False, "query_scales": None}


def test_fingerprint_changes_with_each_option_and_not_otherwise(embed_config):
    spec = resolve_model(embed_config.model.handle, embed_config.model.resolved_cache_dir())
    plain = embed_config.replace(features=PLAIN)
    base = embedding_fingerprint(spec, plain)
    # plain settings leave the fingerprint as it was before feature variants existed
    import hashlib
    import json
    legacy = {"model": spec.fingerprint, "input_size": spec.input_size, "resize": "center_crop",
              "views": ["original"], "mode": "mean", "seed": 0}
    assert base == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()
    # the shipped defaults are the neutral plain ones (issue 17): same fingerprint as legacy
    shipped = load_config().features
    assert (shipped.scales, shipped.flip, shipped.query_scales) == ((1.0,), False, None)
    assert embedding_fingerprint(spec, load_config()) == base
    zoomed = embed_config.replace(features={"scales": [1.3], "query_scales": [1.6]})
    assert embedding_fingerprint(spec, zoomed) != base
    embed_config = plain
    seen = {base}
    for change in ({"features": {"flip": True}}, {"features": {"scales": [1.0, 1.3]}},
                   {"features": {"scales": [1.0, 1.2]}},
                   {"features": {"query_scales": [1.3]}},
                   {"augment": {"views": ["original", "hflip"], "mode": "separate"}}):
        fp = embedding_fingerprint(spec, embed_config.replace(**change))
        assert fp not in seen, change
        seen.add(fp)
    # serving-only fusion settings do not change the catalog vectors
    assert embedding_fingerprint(spec, embed_config.replace(fusion={"text_weight": 0.9})) == base


@pytest.mark.heavy
def test_changing_a_feature_option_reembeds_and_unchanged_reuses(embed_config, tmp_path):
    manifest = write_catalog(str(tmp_path / "cat"), num_products=3, images_per_product=2,
                             size=96)
    out = str(tmp_path / "emb")
    flip = embed_config.replace(features={"flip": True, "scales": [1.0, 1.25],
                                          "query_scales": None})
    first = run_embed([manifest], out, flip, run_id="r1")
    assert first.embedded == 6 and first.features == {"flip": True, "scales": [1.0, 1.25]}
    assert first.model["features"] == first.features  # carried into the index manifest
    same = run_embed([manifest], out, flip, run_id="r2", previous=first.snapshot)
    assert (same.embedded, same.reused) == (0, 6)
    plain = run_embed([manifest], out, embed_config.replace(features=PLAIN), run_id="r3",
                      previous=first.snapshot)
    assert (plain.embedded, plain.reused) == (6, 0)
    assert plain.embedding_fingerprint != first.embedding_fingerprint
    v_flip = {r["image_id"]: np.asarray(r["embedding"])
              for r in snapshot.load(first.snapshot).table.to_pylist()}
    v_plain = {r["image_id"]: np.asarray(r["embedding"])
               for r in snapshot.load(plain.snapshot).table.to_pylist()}
    assert all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in v_flip.values())
    assert any(not np.allclose(v_flip[i], v_plain[i], atol=1e-3) for i in v_flip)


def test_serving_embeds_queries_with_the_index_features(embed_config, tmp_path):
    """A catalog photo searched as a query scores ~1.0 on itself only when serving applies
    the same variants (flip + zoom) the catalog was embedded with."""
    from pipelines.core import filesystem as fs
    from pipelines.index.build import run_build_index
    from serving.searcher import CatalogSearcher
    manifest = write_catalog(str(tmp_path / "cat"), num_products=4, images_per_product=2,
                             size=128, seed=5)
    cfg = embed_config.replace(features={"flip": True, "scales": [1.0, 1.4],
                                         "query_scales": None},
                               index={"eval_queries": 8, "recall_threshold": 0.5})
    emb = run_embed([manifest], str(tmp_path / "emb"), cfg, run_id="r1")
    run_build_index(emb.snapshot, str(tmp_path / "index"), cfg, version="v1")
    # serving's own config says nothing about features: the manifest decides
    searcher = CatalogSearcher.open(str(tmp_path / "index"), config=embed_config)
    assert searcher.current.embedder.features == {"flip": True, "scales": [1.0, 1.4]}
    rows = snapshot.load(emb.snapshot).table.to_pylist()
    for row in rows[:4]:
        hit = searcher.search_image(fs.read_bytes(row["image_uri"]), k=1, collapse=False).hits[0]
        assert hit.image_id == row["image_id"]
        assert hit.score == pytest.approx(1.0, abs=1e-4)
