"""Shared fixtures. Tests never touch the network and never write to the working tree."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread per test process (set before torch loads; subprocesses inherit it). The tensors here
# are tiny, and when processes share the cores, idle OpenMP threads spin: on two shared cores the builder
# tests took 10x the CPU time with the default. Renders are single-threaded anyway (generator.single_thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

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
    RenderOptions,
)

TOPK = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "topk.d3m"
CPU = RenderOptions(device="cpu")  # what every rendering test renders with


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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A 3-class ImageFolder (red, green, blue) the tiny teacher classifies perfectly (tests/tiny_teacher.py)."""
    from tiny_teacher import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("data") / "train")


def tiny_build_args(model) -> list[str]:
    """d3m-build options of the shared tiny build; everything else is the model's default (Stable Diffusion's)."""
    return ["--model", str(model), "--teacher", "tiny_teacher:build_teacher", "--ipc", "2", "--grid", "2",
            "--steps", "2", "--ti-steps", "4", "--device", "cpu"]


def tiny_build_settings(model):
    """The same build as :func:`tiny_build_args`, as library settings."""
    from builder.inversion import InversionSettings
    from builder.settings import BuildSettings

    return BuildSettings(model=str(model), teacher="tiny_teacher:build_teacher", ipc=2, grid=2, steps=2,
                         inversion=InversionSettings(steps=4))


@dataclass(frozen=True)
class TinyBuild:
    """A finished d3m-build run; tests read it, and copy ``workdir`` before changing anything."""

    out: Path  # tiny.d3m
    workdir: Path  # tiny.d3m.work
    stderr: str  # the closing summary


@pytest.fixture(scope="session")
def tiny_build(tiny_model, image_folder, tmp_path_factory) -> TinyBuild:
    """One d3m-build of the tiny random model on :func:`image_folder`, shared by the builder tests."""
    from click.testing import CliRunner

    from builder.cli import main

    out = tmp_path_factory.mktemp("build") / "tiny.d3m"
    result = CliRunner().invoke(main, [str(image_folder), "-o", str(out), *tiny_build_args(tiny_model)])
    assert result.exit_code == 0, result.output
    return TinyBuild(out, out.with_name("tiny.d3m.work"), result.stderr)


@pytest.fixture(scope="session")
def topk_cache(tmp_path_factory):
    """A pixel-cache root holding all 20 images of spec/vectors/topk.d3m, rendered once on the CPU.

    Tests that only need these pixels to be there (cards, README snippets, the
    golden fingerprints) copy it with :func:`copy_cache` instead of rendering again.
    """
    from d3mfmt import D3MDataset

    root = tmp_path_factory.mktemp("topk-cache")
    D3MDataset(TOPK, cache_dir=root, render=CPU).materialize(progress=False)
    return root


def copy_cache(root, dest) -> None:
    """Copy a pixel-cache root's keyed folders under ``dest`` (a ``cache_dir``)."""
    shutil.copytree(root, dest, dirs_exist_ok=True)


def run_inspect(*args):
    """``d3m-inspect ARGS`` in this process (CliRunner): exit_code, stdout and stderr apart."""
    from click.testing import CliRunner

    from d3mfmt.cli import inspect_main

    return CliRunner().invoke(inspect_main, [str(a) for a in args])


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
