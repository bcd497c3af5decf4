"""d3m-build end to end on a tiny random model: archive, resume, shards, checkpoints, bad input.

The builds here share one finished build (conftest ``tiny_build``): resume and
merge start from copies of its work directory, so each builds one class, not three.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner
from conftest import tiny_build_args, tiny_build_settings
from tiny_teacher import make_imagefolder

import d3mfmt
from builder.assemble import write_archive
from builder.cli import main
from builder.inversion import InversionSettings
from builder.pipeline import build
from builder.settings import RunOptions
from builder.sources import ImageFolderSource
from builder.workdir import Workdir
from d3mfmt import D3MError

ROOT = Path(__file__).resolve().parent.parent
CPU = RunOptions(device="cpu", progress=False)


def copy_workdir(tiny_build, dest, keep=(0, 1, 2)):
    """A copy of the shared build's work directory holding only the classes in ``keep``."""
    shutil.copytree(tiny_build.workdir, dest)
    for c in {0, 1, 2} - set(keep):
        (dest / "classes" / f"{c:06d}.safetensors").unlink()
    return dest


def test_archive_is_valid_and_labels_describe_regenerated_pixels(tiny_build):
    import torch

    from d3mfmt.generator import Regenerator, fingerprint, split_patches
    from tiny_teacher import build_teacher

    a = d3mfmt.load_file(tiny_build.out)  # every check d3m-inspect's check runs
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


def test_checkpoints_hold_what_the_archive_reads(tiny_build):
    wd = Workdir(tiny_build.workdir, create=False)
    tensors, meta = wd.load_class(1)
    assert set(meta) == {"regenerated", "real_agreement", "inversion", "seconds", "build"}  # no ti_loss, no patch_loss
    assert meta["build"] == wd.record_digest()  # the settings hash of the build it belongs to
    assert set(meta["seconds"]) == {"select", "invert", "label"}
    agreement = d3mfmt.load_file(tiny_build.out).manifest.build["agreement"]["b_green"]
    assert agreement == {"regenerated": round(meta["regenerated"], 4), "real": round(meta["real_agreement"], 4)}
    assert set(tensors) == {"embedding", "seeds", "probs", "fingerprints"}


def test_checkpoints_of_older_builds_read_through_their_accuracy_key(tiny_build, tmp_path):
    wd = Workdir(copy_workdir(tiny_build, tmp_path / "old.work"), create=False)
    for c in range(3):  # rewrite every checkpoint the way builds before the rename wrote it
        tensors, meta = wd.load_class(c)
        old = {**meta, "ti_loss": [0.5, 0.4], "patch_loss": 0.1}
        old["accuracy"] = old.pop("regenerated")
        wd.class_file(c).write_bytes(safetensors.numpy.save(tensors, metadata={"meta": json.dumps(old)}))
    assert wd.load_class(2)[1]["regenerated"] == Workdir(tiny_build.workdir).load_class(2)[1]["regenerated"]
    (tmp_path / "out").mkdir()
    write_archive([wd.path], tmp_path / "out" / "tiny.d3m", d3mfmt.LabelEncoding(), "tiny")
    assert (tmp_path / "out" / "tiny.d3m").read_bytes() == tiny_build.out.read_bytes()


def test_patch_selection_keeps_low_loss_crops(image_folder):
    import torch

    from builder.patches import PatchSettings, make_collages, select_patches
    from tiny_teacher import build_teacher

    images = ImageFolderSource(image_folder).images(2, side=32)
    patches, losses = select_patches(images, 2, build_teacher(), 4, 16, PatchSettings(n_crops=3), torch.Generator().manual_seed(0), "cpu")
    assert patches.shape == (4, 3, 16, 16) and torch.all(losses[1:] >= losses[:-1])
    collage = make_collages(patches, 2)
    assert collage.shape == (1, 3, 32, 32) and torch.equal(collage[0, :, :16, 16:], patches[1])


def test_shards_then_merge_equal_a_single_run(tiny_model, image_folder, tiny_build, tmp_path):
    # shard 1/3 builds class 1 alone; the single run's classes 0 and 2 stand in for the other shards
    shard = build(ImageFolderSource(image_folder), tiny_build_settings(tiny_model), tmp_path / "wd1",
                  run=RunOptions(shard=(1, 3), device="cpu", progress=False))
    assert [c for c in range(3) if shard.done(c)] == [1]
    others = copy_workdir(tiny_build, tmp_path / "wd0", keep=(0, 2))
    (tmp_path / "out").mkdir()
    partial = CliRunner().invoke(main, ["merge", str(others), "-o", str(tmp_path / "out" / "tiny.d3m")])
    assert partial.exit_code == 1 and "classes [1] are not built yet" in partial.stderr
    assert not (tmp_path / "out" / "tiny.d3m").exists()
    merged = CliRunner().invoke(main, ["merge", str(others), str(shard.path), "-o", str(tmp_path / "out" / "tiny.d3m")])
    assert merged.exit_code == 0, merged.output
    assert merged.stdout.strip() == str(tmp_path / "out" / "tiny.d3m")
    assert (tmp_path / "out" / "tiny.d3m").read_bytes() == tiny_build.out.read_bytes()


def test_resume_after_a_killed_build_gives_the_same_archive(tiny_model, image_folder, tiny_build, tmp_path, caplog):
    # what kill -9 during class 2 leaves: the record, finished checkpoints, a half-written temporary
    # file from the atomic write in flight, and no archive
    wd = copy_workdir(tiny_build, tmp_path / "wd", keep=(0, 1))
    (wd / "classes" / ".000002.safetensors.x7k2m9.tmp").write_bytes(b"half a checkpoint")
    finished = (wd / "classes" / "000000.safetensors").read_bytes()
    caplog.set_level(logging.INFO, logger="d3m-build")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "tiny.d3m"
    again = CliRunner().invoke(main, [str(image_folder), "-o", str(out), *tiny_build_args(tiny_model),
                                      "--workdir", str(wd)])
    assert again.exit_code == 0, again.output
    assert "resuming: 2 of 3 classes already done" in caplog.text
    assert (wd / "classes" / "000000.safetensors").read_bytes() == finished  # not built again
    assert out.read_bytes() == tiny_build.out.read_bytes()


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_archive(tiny_model, image_folder, tiny_build, tmp_path):
    # the real thing the test above reproduces: SIGKILL a d3m-build process after its first class
    out, wd = tmp_path / "tiny.d3m", tmp_path / "wd"
    cmd = [sys.executable, "-c", "from builder.cli import main; main()", str(image_folder), "-o", str(out),
           *tiny_build_args(tiny_model), "--workdir", str(wd)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
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
    assert out.read_bytes() == tiny_build.out.read_bytes()


def test_bad_inputs_fail_early_and_write_nothing(tiny_model, image_folder, tmp_path):
    out = tmp_path / "x.d3m"

    def fails(match, source=None, **kw):
        with pytest.raises(D3MError, match=match):
            wd = build(source or ImageFolderSource(image_folder), replace(tiny_build_settings(tiny_model), **kw),
                       tmp_path / "wd", run=CPU)
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
    with pytest.raises(D3MError, match=r"--shard 3/3: need 0 <= i < n"):  # checked in the library too
        build(ImageFolderSource(image_folder), tiny_build_settings(tiny_model), tmp_path / "wd",
              run=RunOptions(shard=(3, 3), device="cpu"))
    assert not (tmp_path / "wd").exists()


def test_cli_reports_errors_without_traceback(tmp_path):
    out = CliRunner().invoke(main, [str(tmp_path / "missing"), "-o", str(tmp_path / "o.d3m"),
                                    "--model", "d3m/tiny-mnist", "--teacher", "mnist-cnn"])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit)
    assert out.stderr.startswith("d3m-build: data folder") and "does not exist" in out.stderr
    assert not (tmp_path / "o.d3m").exists()


def test_shard_parsing_and_launcher_environments():
    from builder.shards import parse_shard, shard_classes

    assert parse_shard("1/4") == (1, 4)
    assert parse_shard("auto", {}) == (0, 1)
    assert parse_shard("auto", {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8)
    assert parse_shard("auto", {"SLURM_PROCID": "2", "SLURM_NTASKS": "5"}) == (2, 5)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "10"}) == (7, 10)
    for bad in ("4/4", "x", "1/0", "-1/3"):
        with pytest.raises(D3MError, match="--shard"):
            parse_shard(bad)
    assert shard_classes(7, (1, 3)) == [1, 4] and shard_classes(2, (0, 1)) == [0, 1]


def test_seed_candidates_are_scored_against_the_class_itself(tiny_model):
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


@pytest.mark.parametrize("kind_option", ["--label-kind", "--labels"])
def test_bad_label_options_fail_before_building(image_folder, tmp_path, kind_option):
    out = CliRunner().invoke(main, [str(image_folder), "-o", str(tmp_path / "o.d3m"), "--model", "d3m/tiny-mnist",
                                    "--teacher", "mnist-cnn", kind_option, "topk", "--values", "f32"])
    assert out.exit_code == 1 and "values must be one of" in out.stderr
    assert not (tmp_path / "o.d3m.work").exists()


def test_zero_inversion_steps_keep_the_initial_word(tiny_model, image_folder, tmp_path):
    from builder.initialisers import initial_vectors
    from d3mfmt.generator import shared_pipeline
    from d3mfmt.modelpin import model_identity

    settings = replace(tiny_build_settings(tiny_model), inversion=InversionSettings(steps=0))
    wd = build(ImageFolderSource(image_folder), settings, tmp_path / "wd",
               run=RunOptions(shard=(0, 3), device="cpu", progress=False))
    tensors, meta = wd.load_class(0)
    assert meta["inversion"]["best_step"] == 0 and [step for step, _ in meta["inversion"]["val_curve"]] == [0]
    pipe = shared_pipeline(tiny_model, model_identity(tiny_model), "cpu", "float32")
    word = initial_vectors(pipe, "a_red", 1, "object")[0].numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(tensors["embedding"], word)
    assert meta["inversion"]["init_words"] == ["a_red"]


def test_build_info_records_inversion_validation_per_class(tiny_build):
    from d3mfmt.cli import inspect_main
    from d3mfmt.summary import inversion_summary

    a = d3mfmt.load_file(tiny_build.out)
    inv = a.manifest.build["inversion"]
    assert sorted(inv) == ["a_red", "b_green", "c_blue"]
    for entry in inv.values():
        assert set(entry) == {"init_words", "val_loss_init", "val_loss_best", "best_step", "norm_init", "norm_best",
                              "vocab_norm", "skipped_steps", "render_init", "render_best"}
        assert entry["skipped_steps"] == 0 and entry["vocab_norm"] > 0 and entry["render_best"] >= entry["render_init"]
        assert entry["val_loss_best"] <= entry["val_loss_init"] and 0 <= entry["best_step"] <= 4
    summary = inversion_summary(a.manifest.build)
    assert summary["classes"] == 3 and summary["unreadable"] == 0
    assert summary["improved"] == sum(e["val_loss_best"] < e["val_loss_init"] for e in inv.values())
    text = CliRunner().invoke(inspect_main, [str(tiny_build.out)]).stdout
    assert f"val loss improved on {summary['improved']}/3 classes" in text
    assert inversion_summary({"inversion": {"x": {"val_loss_init": "?"}}})["unreadable"] == 1
    renders = summary["renders"]
    assert renders["classes"] == 3 and renders["moved"] == sum(e["best_step"] > 0 for e in inv.values())
    assert renders["kept"] == pytest.approx(np.mean([e["render_best"] for e in inv.values()]), abs=1e-6)
    assert f"teacher on scoring renders {100 * renders['init']:.1f}% -> {100 * renders['kept']:.1f}%" in text
    # hand-made entries: fractions only, the rest ignored
    hand = {"inversion": {"a": {"render_init": 0.5, "render_best": 1.0, "best_step": 50},
                          "b": {"render_init": 0.25, "render_best": 0.25, "best_step": 0},
                          "c": {"render_init": 2.0, "render_best": True}}}
    assert inversion_summary(hand)["renders"] == {"classes": 2, "moved": 1, "init": 0.375, "kept": 0.625}
    assert inversion_summary({"inversion": {"a": {"val_loss_init": 1.0, "val_loss_best": 0.5}}})["renders"] is None
