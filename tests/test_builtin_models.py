"""The built-in demo: MNIST split, teacher, tiny text-to-image model, resolver.

Offline and fast: nothing here touches the network (HF_HUB_OFFLINE=1) or writes
outside pytest's tmp_path.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from d3mfmt import modelpin, models  # noqa: E402
from d3mfmt.errors import D3MError, D3MModelError  # noqa: E402
from d3mfmt.mnist import MNIST_CLASS_NAMES, load_mnist, split_indices  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path) -> str:
    """Run code in a fresh interpreter (offline, repo importable); return stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "D3MFMT_CACHE_DIR": str(cwd)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(tmp_path / "d3mfmt-cache"))


# --- data -------------------------------------------------------------------

def test_split_is_400_100_per_class_and_disjoint():
    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    assert x_train.shape == (4000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (1000, 28, 28) and y_test.dtype == np.int64
    assert np.bincount(y_train).tolist() == [400] * 10
    assert np.bincount(y_test).tolist() == [100] * 10
    train, test = set(split_indices("train").tolist()), set(split_indices("test").tolist())
    assert not train & test and len(train | test) == 5000
    assert 0 < x_train.max() == 255 and len(MNIST_CLASS_NAMES) == 10


def test_split_name_is_checked():
    with pytest.raises(D3MError, match="split must be one of"):
        load_mnist("validation")


def test_consumer_modules_do_not_import_torch(tmp_path):
    out = run_python("""
        import sys
        import d3mfmt.mnist, d3mfmt.models
        print(sorted(m for m in ("torch", "diffusers", "transformers", "huggingface_hub") if m in sys.modules))
    """, tmp_path)
    assert out.strip() == "[]"


# --- teacher ----------------------------------------------------------------

def test_teacher_reaches_98_percent_on_held_out_digits():
    import torch

    from builder.teachers import load_teacher

    teacher = load_teacher("mnist-cnn")
    assert not teacher.training
    images, labels = load_mnist("test")
    x = torch.nn.functional.pad(torch.from_numpy(images).float().div(255).unsqueeze(1), (2, 2, 2, 2))
    with torch.no_grad():
        logits = teacher(x)
        rgb_logits = teacher(x.expand(-1, 3, -1, -1))
    acc = (logits.argmax(1).numpy() == labels).mean()
    assert acc >= 0.98, acc
    assert torch.allclose(logits, rgb_logits, atol=1e-5)  # grey RGB == 1 channel


def test_unknown_teacher_lists_known_ones():
    from builder.teachers import load_teacher

    with pytest.raises(D3MError, match=r"unknown teacher 'resnet-9000'.*mnist-cnn"):
        load_teacher("resnet-9000")


# --- the built-in text-to-image model ----------------------------------------

def test_builtin_model_generates_through_the_resolver():
    import torch
    from diffusers import StableDiffusionPipeline

    path = models.resolve_model("d3m/tiny-mnist")
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert total <= 10 * 2**20, total
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of handwritten digit seven", num_inference_steps=2, guidance_scale=3.0,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_builtin_pipeline_takes_the_class_word_and_placeholder_slots():
    # the builder initialises a class token from its name (one known word); the slots go after the vocabulary
    from d3mfmt.generator import shared_pipeline
    from d3mfmt.prompts import SLOT_TOKEN, placeholder_prompt

    path = models.resolve_model("d3m/tiny-mnist")
    pipe = shared_pipeline(path, modelpin.model_identity(path), "cpu", "float32")
    assert len(pipe.tokenizer("handwritten digit seven", add_special_tokens=False).input_ids) == 3
    ids, slots = placeholder_prompt(pipe, "a collage of {token}", "{token}", 2)
    assert pipe.tokenizer.convert_ids_to_tokens(slots) == [SLOT_TOKEN.format(0), SLOT_TOKEN.format(1)]
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer) > max(slots)
    prefix = pipe.tokenizer("a collage of", add_special_tokens=False).input_ids
    assert ids[0, 1 : 1 + len(prefix) + 2].tolist() == prefix + slots  # after the start token


# --- resolver errors ----------------------------------------------------------

def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(D3MModelError, match=r"unknown built-in model 'd3m/tiny-cifar'.*d3m/tiny-mnist"):
        models.resolve_model("d3m/tiny-cifar")


def test_builtin_has_no_revision():
    with pytest.raises(D3MModelError, match="has no revisions"):
        models.resolve_model("d3m/tiny-mnist", revision="main")


def test_missing_directory_is_reported(tmp_path):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(D3MModelError, match="not an existing directory") as info:
        models.resolve_model(missing)
    assert missing in str(info.value)


def test_directory_without_model_index_is_reported(tmp_path):
    with pytest.raises(D3MModelError, match="has no model_index.json"):
        models.resolve_model(str(tmp_path))


def test_directory_resolves_as_is(tmp_path):
    copy = shutil.copytree(models.resolve_model("d3m/tiny-mnist"), tmp_path / "copy")
    assert models.resolve_model(str(copy)) == copy.resolve()


def test_directory_of_another_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(D3MModelError, match="is a 'None' pipeline.*supports StableDiffusionPipeline"):
        models.resolve_model(str(tmp_path))


def test_uncached_hub_model_says_how_to_get_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(D3MModelError) as info:
        models.resolve_model("some-org/not-downloaded", revision="v1")
    message = str(info.value)
    assert "'some-org/not-downloaded'" in message and "not in the local Hugging Face cache" in message
    assert "`hf download some-org/not-downloaded --revision v1`" in message
    assert str(tmp_path) in message


def test_download_is_refused_while_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(D3MModelError, match="HF_HUB_OFFLINE is set"):
        models.resolve_model("some-org/not-downloaded", allow_download=True)


def test_cached_hub_model_resolves_to_its_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(models.resolve_model("d3m/tiny-mnist"), snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.resolve_model("some-org/tiny") == snapshot
    assert models.resolve_model("some-org/tiny", revision=commit) == snapshot
    with pytest.raises(D3MModelError, match="not in the local Hugging Face cache"):
        models.resolve_model("some-org/tiny", revision="v2")


# --- model identity -------------------------------------------------------------

def test_model_identity_is_stable_and_tracks_what_is_loaded(tmp_path):

    copy = tmp_path / "tiny-mnist"
    shutil.copytree(models.resolve_model("d3m/tiny-mnist"), copy)
    first = modelpin.model_identity(copy)
    assert first.startswith("files-sha256:") and len(first) == 13 + 64
    modelpin._DIGEST_MEMO.clear()  # the sidecar digest table answers now
    assert modelpin.model_identity(copy) == first
    assert modelpin.model_identity(models.resolve_model("d3m/tiny-mnist")) == first  # same bytes
    (copy / "README.md").write_text("not part of the identity")
    scheduler = copy / "scheduler" / "scheduler_config.json"  # the archive carries the scheduler it renders with
    scheduler.write_text(scheduler.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    (copy / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"an unused variant")
    assert modelpin.model_identity(copy) == first
    config = copy / "vae" / "config.json"
    config.write_text(config.read_text().replace("\n", "\n\n", 1))
    assert modelpin.model_identity(copy) != first


def test_model_identity_matches_its_definition(tmp_path):
    files = modelpin.model_files(models.resolve_model("d3m/tiny-mnist"))
    listing = "".join(
        f"{hashlib.sha256((files.root / rel).read_bytes()).hexdigest()}  {rel}\n" for rel in sorted(files.files)
    )
    assert files.listing() == listing
    assert modelpin.model_identity(files.root) == "files-sha256:" + hashlib.sha256(listing.encode()).hexdigest()
