"""d3m-build end to end on a tiny random model: archive, resume after kill -9, shards, bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_teacher import make_imagefolder

import d3mfmt
from builder.build import BuildSettings, InversionSettings, build, write_archive
from builder.sources import ImageFolderSource
from d3mfmt import D3MError

ROOT = Path(__file__).resolve().parent.parent


def settings(model_dir: Path, **kw) -> BuildSettings:
    base = dict(model=str(model_dir), teacher="tiny_teacher:build_teacher", ipc=2, grid=2, steps=2, guidance_scale=2.0,
                prompt_template="a photo of {token}", inversion=InversionSettings(steps=4, batch=4))
    return BuildSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("data") / "train")


@pytest.fixture(scope="module")
def single_run(tiny_model, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    wd = build(ImageFolderSource(data), settings(tiny_model), root / "wd", device="cpu", progress=False)
    out = root / "out.d3m"
    write_archive([wd.path], out, d3mfmt.LabelEncoding(), "out")
    return out


def test_archive_is_valid_and_labels_describe_regenerated_pixels(single_run):
    from d3mfmt.generator import Regenerator, fingerprint, split_patches
    from tiny_teacher import build_teacher

    import torch

    a = d3mfmt.load_file(single_run)
    ds = a.manifest.dataset
    assert [c.id for c in ds.classes] == ["a_red", "b_green", "c_blue"]
    assert (ds.ipc, ds.grid, a.embeddings.shape, a.seeds.shape) == (2, 2, (3, 1, 32), (3, 2))
    assert a.manifest.labels.kind == "topk" and a.manifest.labels.k == 3
    assert a.manifest.teacher.name == "tiny_teacher:build_teacher" and a.manifest.teacher.identity.startswith("sha256:")
    # a consumer regenerates the same pixels: same fingerprints, and the teacher gives the stored labels
    regen = Regenerator(a.manifest.generator, a.embeddings, d3mfmt.RenderOptions(device="cpu"))
    teacher = build_teacher()
    for c in range(3):
        images = regen.render(c, a.seeds[c].tolist())
        np.testing.assert_array_equal(fingerprint(images, 4), a.fingerprints[c])
        probs = torch.softmax(teacher(split_patches(images, 2).flatten(0, 1)).double(), 1).numpy()
        rows = slice(c * 8, (c + 1) * 8)
        np.testing.assert_array_equal(a.labels.dense(rows).argmax(1), probs.argmax(1))
    check = subprocess.run([sys.executable, "-c", "from d3mfmt.cli import inspect_main; inspect_main()",
                            "check", str(single_run)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_patch_selection_keeps_low_loss_crops(tiny_model, data, tmp_path):
    import torch

    from builder.patches import PatchSettings, make_collages, select_patches
    from tiny_teacher import build_teacher

    images = ImageFolderSource(data).images(2, side=32)
    patches, losses = select_patches(images, 2, build_teacher(), 4, 16, PatchSettings(n_crops=3), torch.Generator().manual_seed(0), "cpu")
    assert patches.shape == (4, 3, 16, 16) and torch.all(losses[1:] >= losses[:-1])
    collage = make_collages(patches, 2)
    assert collage.shape == (1, 3, 32, 32) and torch.equal(collage[0, :, :16, 16:], patches[1])


def test_shards_then_merge_equal_a_single_run(tiny_model, data, single_run, tmp_path):
    source, s = ImageFolderSource(data), settings(tiny_model)
    build(source, s, tmp_path / "wd0", shard=(0, 2), device="cpu", progress=False)
    build(source, s, tmp_path / "wd1", shard=(1, 2), device="cpu", progress=False)
    with pytest.raises(D3MError, match=r"classes \[1\] are not built yet"):
        write_archive([tmp_path / "wd0"], tmp_path / "partial.d3m", d3mfmt.LabelEncoding(), "out")
    assert not (tmp_path / "partial.d3m").exists()
    write_archive([tmp_path / "wd0", tmp_path / "wd1"], tmp_path / "out.d3m", d3mfmt.LabelEncoding(), "out")
    assert (tmp_path / "out.d3m").read_bytes() == single_run.read_bytes()


def test_resume_after_kill_9_gives_the_same_archive(tiny_model, data, single_run, tmp_path):
    out, wd = tmp_path / "out.d3m", tmp_path / "wd"
    cmd = [sys.executable, "-c", "from builder.cli import main; main()", str(data), "-o", str(out),
           "--model", str(tiny_model), "--teacher", "tiny_teacher:build_teacher", "--ipc", "2", "--grid", "2",
           "--steps", "2", "--guidance", "2.0", "--template", "a photo of {token}", "--ti-steps", "4",
           "--ti-batch", "4", "--workdir", str(wd), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (wd / "classes" / "000000.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = sorted(p.name for p in (wd / "classes").glob("*.safetensors"))
    assert "000000.safetensors" in done and len(done) < 3, done
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert out.read_bytes() == single_run.read_bytes()


def test_bad_inputs_fail_early_and_write_nothing(tiny_model, data, tmp_path):
    out = tmp_path / "x.d3m"

    def fails(match, source=None, **kw):
        with pytest.raises(D3MError, match=match):
            wd = build(source or ImageFolderSource(data), settings(tiny_model, **kw), tmp_path / "wd", device="cpu",
                       progress=False)
            write_archive([wd.path], out, d3mfmt.LabelEncoding(), "x")
        assert not out.exists()

    with pytest.raises(D3MError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope")
    empty = make_imagefolder(tmp_path / "empty")
    for f in (empty / "b_green").iterdir():
        f.unlink()
    fails("class 'b_green': no images", source=ImageFolderSource(empty))
    broken = make_imagefolder(tmp_path / "broken")
    (broken / "a_red" / "bad.png").write_bytes(b"not a png")
    fails("unreadable image", source=ImageFolderSource(broken))
    fails(r"logits of shape \(1, 5\), but the data has 3 classes", teacher="tiny_teacher:build_wide_teacher")
    fails("unknown teacher 'nope'", teacher="nope")
    fails("not in the local Hugging Face cache", model="no-such-org/no-such-model")
    fails(r"--ipc must be >= 1, got 0", ipc=0)


def test_cli_reports_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from builder.cli import main; main()", str(tmp_path / "missing"),
                          "-o", str(tmp_path / "o.d3m"), "--model", "d3m/tiny-mnist", "--teacher", "mnist-cnn"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o.d3m").exists()


def test_shard_parsing_and_launcher_environments():
    from builder.build import parse_shard

    assert parse_shard("1/4") == (1, 4)
    assert parse_shard("auto", {}) == (0, 1)
    assert parse_shard("auto", {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8)
    assert parse_shard("auto", {"SLURM_PROCID": "2", "SLURM_NTASKS": "5"}) == (2, 5)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "10"}) == (7, 10)
    for bad in ("4/4", "x", "1/0", "-1/3"):
        with pytest.raises(D3MError, match="--shard"):
            parse_shard(bad)


def test_seed_candidates_are_scored_against_the_class_itself(tiny_model, data):
    from builder.labelling import choose_seeds, render_and_label
    from d3mfmt.generator import Regenerator
    from tiny_pipeline import archive_for
    from tiny_teacher import build_teacher

    arch = archive_for(tiny_model)
    regen = Regenerator(arch.manifest.generator, arch.embeddings[2:3], d3mfmt.RenderOptions(device="cpu"))
    candidates = list(range(100, 108))
    teacher = build_teacher()
    for target in (0, 2):
        kept = choose_seeds(regen, 0, target, candidates, 2, teacher, 2, "cpu")
        probs, _, _ = render_and_label(regen, 0, candidates, teacher, 2, 1.0, None, "cpu")
        ce = -np.log(probs[:, target]).reshape(8, 4).mean(1)
        best = sorted(np.argsort(ce, kind="stable")[:2])
        assert kept == [candidates[k] for k in best], target


def test_truncated_image_is_found_before_the_build(tmp_path):
    folder = make_imagefolder(tmp_path / "trunc")
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(folder / "a_red" / "photo.jpg", quality=95)
    blob = (folder / "a_red" / "photo.jpg").read_bytes()
    (folder / "a_red" / "photo.jpg").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(D3MError, match="unreadable image .*photo.jpg"):
        ImageFolderSource(folder).check()


def test_bad_label_options_fail_before_building(data, tmp_path):
    from click.testing import CliRunner

    from builder.cli import main

    out = CliRunner().invoke(main, [str(data), "-o", str(tmp_path / "o.d3m"), "--model", "d3m/tiny-mnist",
                                    "--teacher", "mnist-cnn", "--labels", "topk", "--values", "f32"])
    assert out.exit_code == 1 and "values must be one of" in out.stderr
    assert not (tmp_path / "o.d3m.work").exists()


def test_zero_inversion_steps_still_build_a_class(tiny_model, data, tmp_path):
    wd = build(ImageFolderSource(data), settings(tiny_model, inversion=InversionSettings(steps=0)), tmp_path / "wd",
               shard=(0, 3), device="cpu", progress=False)
    tensors, meta = wd.load_class(0)
    assert meta["ti_loss"] == [] and tensors["embedding"].shape == (1, 32)


def test_build_info_records_inversion_validation_per_class(single_run):
    from d3mfmt.summary import inversion_summary

    a = d3mfmt.load_file(single_run)
    inv = a.manifest.build["inversion"]
    assert sorted(inv) == ["a_red", "b_green", "c_blue"]
    for entry in inv.values():
        assert set(entry) == {"val_loss_init", "val_loss_best", "best_step"}
        assert entry["val_loss_best"] <= entry["val_loss_init"] and 0 <= entry["best_step"] <= 4
    summary = inversion_summary(a.manifest.build)
    assert summary["classes"] == 3 and summary["unreadable"] == 0
    assert summary["improved"] == sum(e["val_loss_best"] < e["val_loss_init"] for e in inv.values())
    text = subprocess.run([sys.executable, "-c", "from d3mfmt.cli import inspect_main; inspect_main()", str(single_run)],
                          capture_output=True, text=True, check=True).stdout
    assert f"val loss improved on {summary['improved']}/3 classes" in text
    assert inversion_summary({"inversion": {"x": {"val_loss_init": "?"}}})["unreadable"] == 1
