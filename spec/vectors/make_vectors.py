"""Regenerate the golden archives in spec/vectors/ and their expected contents.

Usage:
    python spec/vectors/make_vectors.py          # rewrite *.d3m and *.json here

Each ``NAME.d3m`` comes with ``NAME.json``: the file's sha256, the content hash,
the manifest as parsed, every tensor as nested lists, the raw label arrays and
the decoded dense labels. tests/test_vectors.py checks the implementation
against both, byte for byte. The generator section names the built-in model
``d3m/tiny-mnist`` so the archives can later be regenerated to pixels.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

import d3mfmt
from d3mfmt import (
    Archive,
    ClassInfo,
    DatasetInfo,
    EmbeddingInfo,
    GeneratorInfo,
    LabelEncoding,
    Manifest,
    ModelRef,
    SourceInfo,
    TeacherInfo,
)

HERE = Path(__file__).resolve().parent
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DDIM_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
TEXT_DIM = 64  # width of d3m/tiny-mnist's text encoder


def _generator(size: int) -> GeneratorInfo:
    return GeneratorInfo(
        model=ModelRef("d3m/tiny-mnist"),
        scheduler="DDIMScheduler",
        scheduler_config=DDIM_CONFIG,
        steps=20,
        guidance_scale=2.0,
        height=size,
        width=size,
        latent_shape=(4, size // 4, size // 4),
        prompt_template="a collage of {token}" if size > 32 else "a photo of {token}",
    )


def _peaked(rng: np.random.Generator, true: np.ndarray, num_classes: int) -> np.ndarray:
    """Teacher-like rows: most mass on the true class, a short tail."""
    logits = rng.normal(0.0, 1.5, size=(len(true), num_classes))
    logits[np.arange(len(true)), true] += 5.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def onehot() -> Archive:
    """Two classes, one 32-px image each, hard labels: the smallest archive."""
    rng = np.random.default_rng(1)
    classes = (ClassInfo("0", "zero"), ClassInfo("1", "one"))
    enc = LabelEncoding(kind="hard", k=1, values=None)
    manifest = Manifest(
        dataset=DatasetInfo("golden-onehot", classes, ipc=1, grid=1),
        generator=_generator(32),
        embeddings=EmbeddingInfo(1, TEXT_DIM, "float16"),
        labels=enc,
    )
    probs = np.eye(2, dtype=np.float32)
    return Archive(
        manifest,
        embeddings=rng.normal(0, 0.5, (2, 1, TEXT_DIM)).astype(np.float16),
        seeds=np.array([[0], [1]], dtype=np.int64),
        labels=d3mfmt.encode_labels(probs, enc),
    )


def topk() -> Archive:
    """Ten digit classes, ipc 2, 2x2 collages, top-3 sqrt-quantised labels, real fingerprints.

    The class embeddings are d3m/tiny-mnist's own input embeddings of the digit
    words, the model identity is pinned, and the fingerprints are those of the
    images the built-in model renders, so `d3m-inspect verify` passes.
    """
    recipe = topk_recipe()
    return replace(recipe, fingerprints=rendered_fingerprints(recipe))


def topk_recipe() -> Archive:
    """``topk()`` before rendering: everything but the fingerprints (``fingerprints`` is None)."""
    from d3mfmt.generator import shared_pipeline
    from d3mfmt.modelpin import model_identity
    from d3mfmt.models import resolve_model

    rng = np.random.default_rng(2)
    path = resolve_model("d3m/tiny-mnist")
    identity = model_identity(path)
    pipe = shared_pipeline(path, identity, "cpu", "float32")
    rows = [pipe.tokenizer.convert_tokens_to_ids(word + "</w>") for word in DIGITS]
    embeddings = pipe.text_encoder.get_input_embeddings().weight.detach().numpy()[rows][:, None, :].astype(np.float16)
    classes = tuple(ClassInfo(str(i), name) for i, name in enumerate(DIGITS))
    enc = LabelEncoding(kind="topk", k=3, values="u8sqrt", temperature=1.0)
    gen = _generator(64)
    gen = replace(gen, model=ModelRef("d3m/tiny-mnist", None, identity), prompt_template="a collage of handwritten digit {token}")
    manifest = Manifest(
        dataset=DatasetInfo("golden-topk", classes, ipc=2, grid=2, source=SourceInfo("mnist-5k-train", None, "CC-BY-SA-3.0")),
        generator=gen,
        embeddings=EmbeddingInfo(1, TEXT_DIM, "float16"),
        labels=enc,
        teacher=TeacherInfo("mnist-cnn", None, 0.99),
        fingerprint_size=4,
    )
    seeds = rng.integers(0, 2**31, (10, 2), dtype=np.int64)
    true = np.repeat(np.arange(10), 2 * 4)
    return Archive(
        manifest,
        embeddings=embeddings,
        seeds=seeds,
        labels=d3mfmt.encode_labels(_peaked(rng, true, 10), enc),
    )


def rendered_fingerprints(archive: Archive) -> np.ndarray:
    """uint8 ``[classes, ipc, F, F]``: the fingerprints of every image the archive renders to on the CPU."""
    from d3mfmt.generator import Regenerator, fingerprint

    regen = Regenerator(archive.manifest.generator, archive.embeddings, d3mfmt.RenderOptions(device="cpu"))
    size = archive.manifest.fingerprint_size
    return np.stack([fingerprint(regen.render(c, seeds.tolist()), size) for c, seeds in enumerate(archive.seeds)])


def multivector() -> Archive:
    """Three classes with two float32 vectors each and dense fp16 labels."""
    rng = np.random.default_rng(3)
    classes = (ClassInfo("n01440764", "tench"), ClassInfo("n01443537", "goldfish"), ClassInfo("n01484850", "great white shark"))
    enc = LabelEncoding(kind="dense", k=None, values="f16", temperature=2.0)
    manifest = Manifest(
        dataset=DatasetInfo("golden-multivector", classes, ipc=1, grid=2),
        generator=_generator(64),
        embeddings=EmbeddingInfo(2, TEXT_DIM, "float32"),
        labels=enc,
        teacher=TeacherInfo("example-teacher", "sha256:" + "0" * 64, None),
        build={"tool": "spec/vectors/make_vectors.py", "settings": {"note": "synthetic"}},
    )
    true = np.repeat(np.arange(3), 4)
    return Archive(
        manifest,
        embeddings=rng.normal(0, 0.5, (3, 2, TEXT_DIM)).astype(np.float32),
        seeds=np.array([[7], [2**40], [2**63 - 1]], dtype=np.int64),
        labels=d3mfmt.encode_labels(_peaked(rng, true, 3), enc),
    )


VECTORS = {"onehot": onehot, "topk": topk, "multivector": multivector}


def expected_contents(data: bytes) -> dict:
    """What a correct reader decodes from ``data``, as JSON-able values."""
    archive = d3mfmt.load(data)
    t = archive.labels
    return {
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "file_bytes": len(data),
        "content_hash": archive.content_hash,
        "manifest": archive.manifest.to_dict(),
        "embeddings": archive.embeddings.astype(np.float64).tolist(),
        "seeds": archive.seeds.tolist(),
        "fingerprints": None if archive.fingerprints is None else archive.fingerprints.tolist(),
        "label_indices": None if t.indices is None else t.indices.tolist(),
        "label_values": None if t.values is None else t.values.astype(np.float64).tolist(),
        "labels_dense": t.dense().astype(np.float64).tolist(),
    }


def main() -> None:
    for name, make in VECTORS.items():
        data = d3mfmt.save(make())
        (HERE / f"{name}.d3m").write_bytes(data)
        (HERE / f"{name}.json").write_text(json.dumps(expected_contents(data), indent=1, sort_keys=True) + "\n")
        print(f"{name}.d3m: {len(data)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
