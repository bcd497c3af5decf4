"""d3m-build on the real checkpoints' layouts (tests/real_configs.py): build -> check -> verify -> D3MDataset.

Each layout is built once (2 classes, IPC 1, 64 px, 2 DDIM steps, 2 inversion steps, a 2-class
teacher) and shared by the tests of this module. SDXL and single-file checkpoints are refused
before any data is read.
"""

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_teacher import make_imagefolder

import d3mfmt
import real_configs as rc
from builder.cli import main
from d3mfmt import RenderOptions, modelpin
from d3mfmt.cli import inspect_main
from d3mfmt.modelpin import model_files, model_identity

HUB_ID = "runwayml/stable-diffusion-v1-5"


@dataclass(frozen=True)
class Built:
    out: Path
    stderr: str
    manifest: d3mfmt.Manifest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Model folders (SD 1.5 also as a full hub-cache snapshot and a diffusers-files-only copy), data, caches."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("realbuild")
    mp = pytest.MonkeyPatch()
    mp.setenv("D3MFMT_CACHE_DIR", str(root / "d3mfmt-cache"))
    full = rc.write_pipeline("sd15", root / "sd15-full", full_snapshot=True)
    mp.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    folders = {
        "hub": rc.hub_cache(root / "hub", HUB_ID, full),
        "files-only": rc.copy_files(full, root / "sd15-files", [*model_files(full).files, "model_index.json",
                                                                  "scheduler/scheduler_config.json"]),
        "sd21": rc.write_pipeline("sd21", root / "sd21"),
        "sd21base": rc.write_pipeline("sd21base", root / "sd21base"),
        "fp16": rc.write_pipeline("sd15", root / "fp16", variant="fp16"),
        "sdxl": rc.write_pipeline("sdxl", root / "sdxl"),
    }
    data = make_imagefolder(root / "data", classes=("a_red", "b_green"), per_class=4)
    yield {"root": root, "folders": folders, "full": full, "data": data}
    mp.undo()


def build_args(data, model, out, *extra):
    return [str(data), "-o", str(out), "--model", str(model), "--teacher", "tiny_teacher:build_teacher2",
            "--ipc", "1", "--grid", "2", "--resolution", str(rc.PIXELS), "--steps", "2", "--ti-steps", "2",
            "--ti-batch", "1", "--device", "cpu", *extra]


_BUILDS: dict = {}


@pytest.fixture(scope="module")
def built(env):
    """build(name) -> Built, each layout built once per module."""
    def get(name: str) -> Built:
        if name not in _BUILDS:
            model, extra = {"sd15": (HUB_ID, ()), "sd15-fp16": (HUB_ID, ("--variant", "fp16")),
                            "sd21": (env["folders"]["sd21"], ()), "sd21base": (env["folders"]["sd21base"], ()),
                            "fp16": (env["folders"]["fp16"], ())}[name]
            out = env["root"] / f"{name}.d3m"
            result = CliRunner().invoke(main, build_args(env["data"], model, out, *extra))
            assert result.exit_code == 0, result.output
            _BUILDS[name] = Built(out, result.stderr, d3mfmt.load_file(out).manifest)
        return _BUILDS[name]
    yield get
    _BUILDS.clear()


def check_verify_render(out: Path, cache: Path, model: Path | None = None):
    """d3m-inspect check and verify (drift 0), then D3MDataset renders a patch; returns the dataset."""
    from d3mfmt import D3MDataset

    assert CliRunner().invoke(inspect_main, ["check", str(out)]).exit_code == 0
    with_model = [] if model is None else ["--model", str(model)]
    verified = CliRunner().invoke(inspect_main, ["verify", str(out), "--device", "cpu", *with_model])
    assert verified.exit_code == 0 and "max drift 0," in verified.output, verified.output
    ds = D3MDataset(out, cache_dir=cache, render=RenderOptions(device="cpu", model=None if model is None else str(model)))
    image, label, c = ds[0]
    assert image.shape == (3, rc.PIXELS // 2, rc.PIXELS // 2) and torch.isfinite(image).all() and c == 0
    assert np.isclose(float(label.sum()), 1.0, atol=1e-3)
    return ds


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd21base", "fp16"])
def test_each_layout_builds_checks_verifies_and_renders(built, env, tmp_path, name):
    b = built(name)
    gen = b.manifest.generator
    assert gen.scheduler == "DDIMScheduler" and gen.dtype == "float32" and gen.height == rc.PIXELS
    assert gen.scheduler_config["clip_sample"] is False and gen.scheduler_config["steps_offset"] == 1
    expected_prediction = "v_prediction" if name == "sd21" else "epsilon"
    assert gen.scheduler_config["prediction_type"] == expected_prediction
    assert gen.model.variant == ("fp16" if name == "fp16" else None)
    check_verify_render(b.out, tmp_path / "cache")


def test_sd15_full_snapshot_and_files_only_copy_are_one_model(built, env, tmp_path):
    """Built from the full hub snapshot; a consumer with only the diffusers files renders the same pixels."""
    b = built("sd15")
    files_only = env["folders"]["files-only"]
    assert b.manifest.generator.model.id == HUB_ID
    assert b.manifest.generator.model.identity == model_identity(env["full"]) == model_identity(files_only)
    from_copy = check_verify_render(b.out, tmp_path / "a", files_only)
    from_hub = check_verify_render(b.out, tmp_path / "b")
    assert torch.equal(from_copy[1][0], from_hub[1][0])


def test_variant_is_recorded_and_a_snapshot_with_both_renders_it(built, env, tmp_path):
    b = built("sd15-fp16")
    assert b.manifest.generator.model.variant == "fp16"
    assert b.manifest.generator.model.identity == model_identity(env["full"], "fp16") != model_identity(env["full"])
    check_verify_render(b.out, tmp_path / "cache")  # the hub snapshot holds plain and fp16: the record chooses


def test_fp16_only_folder_is_detected_without_variant(built, env):
    gen = built("fp16").manifest.generator
    assert gen.model.identity == model_identity(env["folders"]["fp16"], "fp16")
    assert json.loads((built("fp16").out.with_name("fp16.d3m.work") / "settings.json").read_text())[
        "settings"]["variant"] is None  # the setting stays what was asked; the generator records what loaded


def test_clip_sample_is_recorded_as_the_pipeline_applies_it(env, tmp_path):
    """A scheduler config without clip_sample (DDIM's default: true), steps_offset 0: the pipeline renders with
    clip_sample false and steps_offset 1, and the manifest records exactly that."""
    from d3mfmt.generator import Regenerator

    folder = shutil.copytree(env["folders"]["sd21base"], tmp_path / "old-config")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    del config["clip_sample"]
    config["steps_offset"] = 0
    config_path.write_text(json.dumps(config))
    out = tmp_path / "old.d3m"
    result = CliRunner().invoke(main, build_args(env["data"], folder, out, "--shard", "0/2"))
    assert result.exit_code == 0, result.output
    gen = d3mfmt.manifest.generator_from_dict(
        json.loads((tmp_path / "old.d3m.work" / "settings.json").read_text())["generator"])
    assert gen.scheduler_config["clip_sample"] is False and gen.scheduler_config["steps_offset"] == 1
    applied = Regenerator(gen, np.zeros((1, 1, 32), np.float32), RenderOptions(device="cpu")).pipe.scheduler.config
    assert {k: applied[k] for k in gen.scheduler_config} == gen.scheduler_config


@pytest.mark.parametrize("case", ["sdxl", "single-file", "missing-variant"])
def test_unsupported_models_are_refused_before_any_data_is_read(env, tmp_path, case):
    """The data here cannot be read at all: a build that looked at it first would say so instead."""
    unreadable = make_imagefolder(tmp_path / "data", classes=("a_red", "b_green"), per_class=1)
    for f in unreadable.rglob("*.png"):
        f.write_bytes(b"not an image")
    model, extra, fix = {
        "sdxl": (env["folders"]["sdxl"], (), "supports StableDiffusionPipeline checkpoints"),
        "single-file": (rc.single_file_checkpoint(tmp_path / "v1-5-pruned-emaonly.safetensors"), (),
                        "from_single_file("),
        "missing-variant": (env["folders"]["sd21base"], ("--variant", "fp16"), "variants present"),
    }[case]
    out = tmp_path / "x.d3m"
    result = CliRunner().invoke(main, build_args(unreadable, model, out, *extra))
    assert result.exit_code == 1 and fix in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "unreadable image" not in result.stderr
    assert not out.exists() and not out.with_name("x.d3m.work").exists()


def test_cpu_cost_is_warned_once_per_process(env, tmp_path, monkeypatch, caplog, recwarn):
    """An SD-sized UNet on the CPU (here: the threshold lowered to the fixture's size) warns once, with a cost."""
    import logging

    from d3mfmt import cpucost
    from d3mfmt.generator import Regenerator

    monkeypatch.setattr(cpucost, "SD_SIZED_PARAMETERS", 1)
    monkeypatch.setattr(cpucost, "_warned", False)
    caplog.set_level(logging.WARNING, logger="d3m-build")
    out = tmp_path / "w.d3m"
    result = CliRunner().invoke(main, build_args(env["data"], env["folders"]["sd21base"], out, "--shard", "0/2"))
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if "is rendering on the CPU" in r.getMessage()]
    assert len(warned) == 1 and "each image costs about" in warned[0] and "textual inversion adds" in warned[0]
    assert not [w for w in recwarn if "is rendering on the CPU" in str(w.message)]  # not again from the renderer
    gen = d3mfmt.manifest.generator_from_dict(json.loads((tmp_path / "w.d3m.work" / "settings.json").read_text())["generator"])
    monkeypatch.setattr(cpucost, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"UNet evaluation at latents \[4, 8, 8\] took .* s here"):
        Regenerator(gen, np.zeros((1, 1, 32), np.float32), RenderOptions(device="cpu"))
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        Regenerator(gen, np.zeros((1, 1, 32), np.float32), RenderOptions(device="cpu"))  # once per process
    assert not [w for w in again if "is rendering on the CPU" in str(w.message)]
    modelpin._DIGEST_MEMO.clear()
