"""Shared fixtures. Tests never touch the network and never write to the working tree."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import io  # noqa: E402
import json  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

# no .hypothesis/ example database in the working tree (tests never write there)
_hypothesis_settings.register_profile("d3mfmt", database=None)
_hypothesis_settings.load_profile("d3mfmt")

import d3mfmt  # noqa: E402
from d3mfmt import (  # noqa: E402
    Archive,
    ClassInfo,
    DatasetInfo,
    EmbeddingInfo,
    GeneratorInfo,
    LabelEncoding,
    Manifest,
    ModelRef,
)


def make_archive(
    num_classes=3,
    ipc=2,
    grid=2,
    n_vectors=1,
    dim=8,
    encoding=LabelEncoding(),
    fingerprint_size=4,
    seed=0,
    emb_dtype="float16",
) -> Archive:
    """A small valid archive with peaked random labels."""
    rng = np.random.default_rng(seed)
    if encoding.kind == "topk" and encoding.k > num_classes:
        encoding = LabelEncoding(encoding.kind, num_classes, encoding.values, encoding.temperature)
    manifest = Manifest(
        dataset=DatasetInfo("test", tuple(ClassInfo(f"c{i}", f"class {i}") for i in range(num_classes)), ipc, grid),
        generator=GeneratorInfo(
            model=ModelRef("test/no-such-model"),  # a name only: format tests never render it
            scheduler="DDIMScheduler",
            scheduler_config={"num_train_timesteps": 1000},
            steps=4,
            guidance_scale=1.0,
            height=16 * grid,
            width=16 * grid,
            latent_shape=(4, 4 * grid, 4 * grid),
            prompt_template="a photo of {token}",
        ),
        embeddings=EmbeddingInfo(n_vectors, dim, emb_dtype),
        labels=encoding,
        fingerprint_size=fingerprint_size,
    )
    rows = num_classes * ipc * grid * grid
    logits = rng.normal(0, 2, (rows, num_classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return Archive(
        manifest,
        embeddings=rng.normal(0, 1, (num_classes, n_vectors, dim)).astype(emb_dtype),
        seeds=rng.integers(0, 2**62, (num_classes, ipc), dtype=np.int64),
        labels=d3mfmt.encode_labels(probs, encoding),
        fingerprints=None
        if fingerprint_size is None
        else rng.integers(0, 256, (num_classes, ipc, fingerprint_size, fingerprint_size), dtype=np.uint8),
    )


def zip_members(entries, compress_type=zipfile.ZIP_STORED) -> bytes:
    """A ZIP of (name, bytes) pairs, written without any of d3mfmt's checks."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compress_type if name != "mimetype" else zipfile.ZIP_STORED
            info.create_system, info.external_attr = 3, 0o100644 << 16  # the header fields SPEC fixes
            zf.writestr(info, data)
    return buf.getvalue()


def members_of(data: bytes) -> list:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def with_manifest(data: bytes, mutate) -> bytes:
    """Rewrite an archive's manifest through ``mutate(dict)`` (payload untouched)."""
    entries = members_of(data)
    doc = json.loads(entries[1][1])
    mutate(doc)
    entries[1] = ("manifest.json", json.dumps(doc).encode())
    return zip_members(entries)


def with_member(data: bytes, name: str, payload: bytes, fix_hash: bool = True) -> bytes:
    """Replace a payload member; by default also fix its size and sha256 in the manifest."""
    import hashlib

    entries = [(n, payload if n == name else b) for n, b in members_of(data)]
    out = zip_members(entries)
    if fix_hash:
        out = with_manifest(
            out,
            lambda d: d["members"].__setitem__(name, {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}),
        )
    return out


@pytest.fixture
def archive_bytes() -> bytes:
    return d3mfmt.save(make_archive())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Folder of a random tiny diffusers pipeline (see tests/tiny_pipeline.py)."""
    from tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_archive_path(tiny_model, tmp_path_factory):
    """A .d3m file for the tiny model: 3 classes, IPC 4, 2x2 grid, real fingerprints."""
    from tiny_pipeline import archive_for

    path = tmp_path_factory.mktemp("archives") / "tiny.d3m"
    d3mfmt.save_file(archive_for(tiny_model), path)
    return path


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (minutes of CPU)")


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run only with --run-slow (or D3MFMT_RUN_SLOW=1); ``gpu`` tests only where CUDA is."""
    run_slow = config.getoption("--run-slow") or os.environ.get("D3MFMT_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow or D3MFMT_RUN_SLOW=1")
    has_cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords:
            if has_cuda is None:
                import torch

                has_cuda = torch.cuda.is_available()
            if not has_cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
