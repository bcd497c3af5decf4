"""The implementation against the golden archives in spec/vectors/, byte for byte."""

import importlib.util
import json
from pathlib import Path

from dataclasses import replace

import jsonschema
import numpy as np
import pytest
from conftest import CPU, TOPK

import d3mfmt

SPEC = Path(__file__).resolve().parent.parent / "spec"
NAMES = ["onehot", "topk", "multivector"]


def _make_vectors():
    spec = importlib.util.spec_from_file_location("make_vectors", SPEC / "vectors" / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def schema():
    return json.loads((SPEC / "manifest.schema.json").read_text())


@pytest.fixture(scope="module")
def topk_fingerprints(topk_cache):
    """The fingerprints of all 20 images topk.d3m renders to (read from the session's pixel cache)."""
    from d3mfmt import D3MDataset
    from d3mfmt.generator import fingerprint

    ds = D3MDataset(TOPK, cache_dir=topk_cache, render=CPU)
    images = ds.render_images(range(20))
    assert len(list(ds.image_cache_dir.glob("*.npy"))) == 20  # all 20 came from the cache
    return np.stack([fingerprint(images[k][None], 4)[0] for k in range(20)]).reshape(10, 2, 4, 4)


@pytest.mark.parametrize("name", ["onehot", "multivector"])
def test_writer_reproduces_golden_bytes(name):
    made = d3mfmt.save(_make_vectors().VECTORS[name]())
    assert made == (SPEC / "vectors" / f"{name}.d3m").read_bytes()


def test_writer_reproduces_golden_bytes_of_topk(topk_fingerprints):
    """make_vectors.topk() = its recipe + the fingerprints of what that recipe renders to.

    The rendering half is the fingerprints of topk.d3m's own images (the
    recipe half being byte-identical, these are the images of the recipe), so
    the 20 images render once per session instead of once here.
    """
    make = _make_vectors()
    made = d3mfmt.save(replace(make.topk_recipe(), fingerprints=topk_fingerprints))
    assert made == TOPK.read_bytes()


def test_make_vectors_fingerprints_every_image_it_renders(tiny_archive_path):
    """The rendering half of make_vectors.topk(), on the tiny archive (12 small images, not 20 large ones)."""
    tiny = d3mfmt.load_file(tiny_archive_path)
    np.testing.assert_array_equal(_make_vectors().rendered_fingerprints(tiny), tiny.fingerprints)


@pytest.mark.parametrize("name", NAMES)
def test_reader_decodes_expected_contents(name, schema):
    data = (SPEC / "vectors" / f"{name}.d3m").read_bytes()
    expected = json.loads((SPEC / "vectors" / f"{name}.json").read_text())
    a = d3mfmt.load(data)
    import hashlib

    assert hashlib.sha256(data).hexdigest() == expected["file_sha256"]
    assert a.content_hash == expected["content_hash"]
    assert a.manifest.to_dict() == expected["manifest"]
    np.testing.assert_array_equal(a.embeddings.astype(np.float64), expected["embeddings"])
    np.testing.assert_array_equal(a.seeds, expected["seeds"])
    if expected["fingerprints"] is None:
        assert a.fingerprints is None
    else:
        np.testing.assert_array_equal(a.fingerprints, expected["fingerprints"])
    np.testing.assert_allclose(a.labels.dense(), expected["labels_dense"], rtol=0, atol=1e-7)
    assert a.manifest.generator.model.id == "d3m/tiny-mnist"
    # the stored manifest satisfies the published JSON Schema
    import zipfile
    import io

    manifest = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("manifest.json"))
    jsonschema.validate(manifest, schema)


def test_schema_rejects_what_the_reader_rejects(schema):
    data = (SPEC / "vectors" / "topk.d3m").read_bytes()
    import io
    import zipfile

    manifest = json.loads(zipfile.ZipFile(io.BytesIO(data)).read("manifest.json"))
    for path, value in [(("dataset", "ipc"), 0), (("version",), "2.0"), (("labels", "values"), "f32"),
                        (("generator", "rng"), "numpy"), (("members", "labels.zst", "sha256"), "x")]:
        bad = json.loads(json.dumps(manifest))
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_golden_vectors_regenerate_to_pixels_through_the_builtin_model(topk_fingerprints):
    from d3mfmt.generator import Regenerator
    from d3mfmt.verify import verify

    for name in ("onehot", "multivector"):
        a = d3mfmt.load_file(SPEC / "vectors" / f"{name}.d3m")
        regen = Regenerator(a.manifest.generator, a.embeddings, CPU)
        gen = a.manifest.generator
        x = regen.render(0, a.seeds[0, :1].tolist())
        assert x.shape == (1, 3, gen.height, gen.width) and x.std() > 0.01
    # topk.d3m pins the model and carries the fingerprints of what it renders: all 20, exactly
    a = d3mfmt.load_file(TOPK)
    np.testing.assert_array_equal(topk_fingerprints, a.fingerprints)
    report = verify(a, CPU, n=2)  # and d3m-inspect verify's own path agrees
    assert report.ok and report.images == [(0, 0), (9, 1)] and int(report.drift.max()) == 0
