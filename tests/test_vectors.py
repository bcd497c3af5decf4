"""The implementation against the golden archives in spec/vectors/, byte for byte."""

import importlib.util
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

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


@pytest.mark.parametrize("name", NAMES)
def test_writer_reproduces_golden_bytes(name):
    made = d3mfmt.save(_make_vectors().VECTORS[name]())
    assert made == (SPEC / "vectors" / f"{name}.d3m").read_bytes()


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


def test_golden_vectors_regenerate_to_pixels_through_the_builtin_model():
    from d3mfmt.generator import Regenerator
    from d3mfmt.verify import DEFAULT_TOLERANCE, verify

    for name in NAMES:
        a = d3mfmt.load_file(SPEC / "vectors" / f"{name}.d3m")
        regen = Regenerator(a.manifest.generator, a.embeddings, device="cpu")
        gen = a.manifest.generator
        x = regen.render(0, a.seeds[0, :1].tolist())
        assert x.shape == (1, 3, gen.height, gen.width)
    # topk.d3m pins the model and carries the fingerprints of what it renders
    a = d3mfmt.load_file(SPEC / "vectors" / "topk.d3m")
    report = verify(a, Regenerator(a.manifest.generator, a.embeddings, device="cpu"), n=20)
    assert report.ok and int(report.drift.max()) <= DEFAULT_TOLERANCE
