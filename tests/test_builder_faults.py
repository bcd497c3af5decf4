"""Builder faults (issue 20): teacher failures, damaged work directories, class entries, image decoding,
option conflicts and the guards that see pile-ups. Work directories are copies of the shared tiny build."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from click.testing import CliRunner
from conftest import make_archive, tiny_build_args
from PIL import Image
from tiny_teacher import ChannelTeacher, make_imagefolder

import d3mfmt
from builder import assemble
from builder.cli import main
from builder.decode import MAX_DECODE_PIXELS, open_image
from builder.guards import archive_warnings, domain_problems, regenerated_precision
from builder.classlist import read_class_list
from builder.sources import ImageFolderSource
from builder.teachers import CheckedTeacher, TeacherError
from builder.workdir import Workdir
from d3mfmt import ClassInfo, D3MError
from d3mfmt.agreement import near_chance, near_chance_limit
from d3mfmt.summary import agreement_summary

ROOT = Path(__file__).resolve().parent.parent


def copy_workdir(tiny_build, dest):
    shutil.copytree(tiny_build.workdir, dest)
    return Workdir(dest, create=False)


def rewrite_class(wd, c, tensors=None, meta=None):
    """Rewrite checkpoint ``c`` with changed tensors and/or metadata (a damaged or foreign checkpoint)."""
    old_tensors, old_meta = wd.load_class(c)
    wd.class_file(c).write_bytes(safetensors.numpy.save(
        {**old_tensors, **(tensors or {})}, metadata={"meta": json.dumps({**old_meta, **(meta or {})})}))


def merge(*args):
    return CliRunner().invoke(main, ["merge", *map(str, args)])


# -- 1. teacher failures -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("out, message", [
    (lambda x: torch.zeros(len(x) - 1, 3), "logits of shape (3, 3) for 4 images"),
    (lambda x: torch.zeros(len(x), 4), "logits of shape (4, 4) for 4 images, expected (4, 3)"),
    (lambda x: torch.full((len(x), 3), float("nan")), "NaN or infinite logits for 4 of 4 images"),
    (lambda x: torch.tensor([[0.0, float("inf"), 0.0]] * len(x)), "NaN or infinite logits for 4 of 4 images"),
    (lambda x: torch.zeros(len(x), 3, dtype=torch.long), "a torch.int64 tensor"),
    (lambda x: 1 / 0, "raised ZeroDivisionError: division by zero on a batch of shape (4, 3, 8, 8)"),
])
def test_every_teacher_call_is_checked(out, message):
    class Teacher(torch.nn.Module):
        def forward(self, x):
            return out(x)

    with pytest.raises(TeacherError, match="the teacher 'my:teacher' ") as info:
        CheckedTeacher(Teacher(), "my:teacher", 3)(torch.zeros(4, 3, 8, 8))
    assert message in str(info.value)
    good = CheckedTeacher(ChannelTeacher(3), "t", 3)(torch.rand(2, 3, 8, 8))
    assert good.shape == (2, 3)


@pytest.mark.parametrize("factory, message", [
    ("build_nan_teacher", "NaN or infinite logits"),
    ("build_short_teacher", "for 30 images, expected (30, 3)"),
    ("build_raising_teacher", "raised RuntimeError: CUDA error: an illegal memory access"),
])
def test_a_teacher_failing_mid_build_stops_at_once_naming_class_and_teacher(tiny_model, image_folder, tmp_path,
                                                                             factory, message):
    args = tiny_build_args(tiny_model)
    args[args.index("tiny_teacher:build_teacher")] = f"tiny_teacher:{factory}"
    out = tmp_path / "x.d3m"
    result = CliRunner().invoke(main, [str(image_folder), "-o", str(out), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"class 'a_red': the teacher 'tiny_teacher:{factory}' " in result.stderr and message in result.stderr
    assert "no checkpoint was written for this class" in result.stderr
    assert not out.exists() and not list((tmp_path / "x.d3m.work" / "classes").iterdir())  # nothing poisoned


def test_a_poisoned_checkpoint_of_an_older_build_is_named(tiny_build, tmp_path):
    wd = copy_workdir(tiny_build, tmp_path / "wd")
    tensors, _ = wd.load_class(2)
    rewrite_class(wd, 2, tensors={"probs": np.full_like(tensors["probs"], np.nan)})
    result = merge(wd.path, "-o", tmp_path / "x.d3m")
    assert result.exit_code == 1 and "000002.safetensors is damaged: probs holds NaN" in result.stderr
    assert "delete it and run the same build again" in result.stderr and not (tmp_path / "x.d3m").exists()


# -- 2. write last; damaged checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("meta, message", [
    ({"seconds": {"select": "1.5", "invert": 2.0, "label": 1.0}}, "'seconds' must map stage names to numbers"),
    ({"regenerated": "0.5"}, "'regenerated' must be a fraction in 0..1, got '0.5'"),
    ({"real_agreement": 7}, "'real_agreement' must be a fraction in 0..1, got 7"),
    ({"inversion": {"val_loss_init": "x", "val_loss_best": 0.1, "best_step": 0}}, "'inversion' must hold numbers"),
    ({"inversion": {"val_loss_init": 1.0, "val_loss_best": 0.1, "best_step": 10**400}}, "'inversion' must hold numbers"),
    ({"regenerated": True}, "'regenerated' must be a fraction in 0..1, got True"),
])
def test_damaged_checkpoint_metadata_is_named_before_anything_is_written(tiny_build, tmp_path, meta, message):
    wd = copy_workdir(tiny_build, tmp_path / "wd")
    rewrite_class(wd, 1, meta=meta)
    out = tmp_path / "x.d3m"
    out.write_bytes(b"the user's file")
    result = merge(wd.path, "-o", out)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "classes/000001.safetensors is damaged: metadata" in result.stderr and message in result.stderr
    assert out.read_bytes() == b"the user's file"


@pytest.mark.parametrize("change, message", [
    (lambda t: {"seeds": t["seeds"].astype(np.float64)}, "seeds must be non-negative int64, got float64"),
    (lambda t: {"seeds": -t["seeds"] - 1}, "seeds must be non-negative int64, got int64 (smallest -"),
    (lambda t: {"fingerprints": t["fingerprints"].astype(np.float32)}, "fingerprints must be uint8, got float32"),
    (lambda t: {"probs": t["probs"] * 3}, "probs rows must be probabilities"),
    (lambda t: {"probs": -t["probs"]}, "probs rows must be probabilities"),
    (lambda t: {"embedding": t["embedding"] * 1e30}, "embedding holds values beyond float16's range"),
])
def test_damaged_checkpoint_tensors_are_named(tiny_build, tmp_path, change, message):
    wd = copy_workdir(tiny_build, tmp_path / "wd")
    rewrite_class(wd, 1, tensors=change(wd.load_class(1)[0]))
    result = merge(wd.path, "-o", tmp_path / "x.d3m")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "classes/000001.safetensors is damaged: " + message in result.stderr and not (tmp_path / "x.d3m").exists()


def test_a_failure_after_joining_leaves_no_archive_and_the_old_file_as_it_was(tiny_build, tmp_path, monkeypatch):
    wd = copy_workdir(tiny_build, tmp_path / "wd")
    out = tmp_path / "x.d3m"
    out.write_bytes(b"the user's file")

    def fail(*args):
        raise D3MError("the summary failed")

    monkeypatch.setattr(assemble, "summarize_build", fail)
    with pytest.raises(D3MError, match="the summary failed"):
        assemble.merge_archives([wd.path], out)
    assert out.read_bytes() == b"the user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["wd", "x.d3m"]


def test_a_checkpoint_path_that_is_a_folder_is_named(tiny_build, tiny_model, image_folder, tmp_path):
    wd = copy_workdir(tiny_build, tmp_path / "wd")
    wd.class_file(1).unlink()
    wd.class_file(1).mkdir()
    result = merge(wd.path, "-o", tmp_path / "x.d3m")
    assert result.exit_code == 1 and "000001.safetensors is not a file; remove it" in result.stderr, result.output
    rebuilt = CliRunner().invoke(main, [str(image_folder), "-o", str(tmp_path / "x.d3m"), "--workdir", str(wd.path),
                                        *tiny_build_args(tiny_model)])
    assert rebuilt.exit_code == 1 and "000001.safetensors is not a file" in rebuilt.stderr, rebuilt.output


def test_an_embedding_narrower_than_the_models_is_refused_before_the_merge(tiny_build, tmp_path):
    wd = copy_workdir(tiny_build, tmp_path / "wd")
    dim = wd.record()["embedding_dim"]
    for c in range(3):  # every class the same (wrong) width: no disagreement between checkpoints to see
        rewrite_class(wd, c, tensors={"embedding": wd.load_class(c)[0]["embedding"][:, : dim - 1].copy()})
    result = merge(wd.path, "-o", tmp_path / "x.d3m")
    assert result.exit_code == 1 and f"embedding has shape (1, {dim - 1}), expected (1, {dim}) (the model's " \
                                      "embedding width)" in result.stderr, result.output
    assert not (tmp_path / "x.d3m").exists()


def test_a_work_directory_of_an_older_build_is_upgraded_on_resume(tiny_build, tmp_path):
    wd = copy_workdir(tiny_build, tmp_path / "wd")
    record = wd.record()
    older = {k: v for k, v in record.items() if k != "embedding_dim"}
    (wd.path / "settings.json").write_text(json.dumps(older))
    wd.bind(record)  # what a resume does: accepted, and the new key recorded
    assert wd.record() == record
    with pytest.raises(D3MError, match="holds a build with other settings"):
        wd.bind({**record, "embedding_dim": record["embedding_dim"] + 1})


# -- 3. merge: the same work directory twice, foreign checkpoints, other label options --------------------------

def test_merge_refuses_a_work_directory_named_twice(tiny_build, tmp_path):
    result = merge(tiny_build.workdir, tiny_build.workdir / ".." / tiny_build.workdir.name, "-o", tmp_path / "x.d3m")
    assert result.exit_code == 1 and "is named twice" in result.stderr and not (tmp_path / "x.d3m").exists()


def test_merge_refuses_a_checkpoint_of_another_build(tiny_build, tmp_path):
    for n, foreign in enumerate(("sha256:" + "0" * 64, 7)):  # a checkpoint copied from another build; a damaged one
        wd = copy_workdir(tiny_build, tmp_path / f"wd{n}")
        assert wd.load_class(0)[1]["build"] == wd.record_digest()
        rewrite_class(wd, 0, meta={"build": foreign})
        result = merge(wd.path, "-o", tmp_path / "x.d3m")
        assert result.exit_code == 1 and "000000.safetensors is damaged: it belongs to another build" in result.stderr
        assert not (tmp_path / "x.d3m").exists()


def test_merge_uses_the_builds_label_options_and_refuses_shards_that_differ(tiny_build, tmp_path):
    a, b = copy_workdir(tiny_build, tmp_path / "a"), copy_workdir(tiny_build, tmp_path / "b")
    assert a.labels() == {"kind": "topk", "k": 5, "values": "u8sqrt"}  # recorded by the build (the default)
    (b.path / "labels.json").write_text(json.dumps({"kind": "dense", "k": None, "values": "f16"}))
    result = merge(a.path, b.path, "-o", tmp_path / "x.d3m")
    assert result.exit_code == 1 and "was built with label options --label-kind dense --values f16" in result.stderr
    assert merge(b.path, "-o", tmp_path / "x.d3m").exit_code == 0  # no options: the build's
    assert d3mfmt.load_file(tmp_path / "x.d3m").manifest.labels.kind == "dense"
    assert merge(b.path, "-o", tmp_path / "y.d3m", "--label-kind", "hard").exit_code == 0  # given: re-encoded
    assert d3mfmt.load_file(tmp_path / "y.d3m").manifest.labels.kind == "hard"


# -- 4. class entries --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ("/etc", "is not a folder name under the data folder"),
    ("../outside", "is not a folder name under the data folder"),
    ("a_red/../../x", "is not a folder name under the data folder"),
    (".", "is not a folder name under the data folder"),
    ("a_red\u202e", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("a\x1b[31m", "U+001B"),
])
def test_class_entries_must_be_plain_folders_under_the_data(image_folder, entry, message):
    with pytest.raises(D3MError, match=re.escape(message)):
        ImageFolderSource(image_folder, [entry, "b_green"])
    with pytest.raises(D3MError, match="U\\+2067"):
        ImageFolderSource(image_folder, ["a_red", "b_green"], ["red", "gr\u2067een"])


def test_a_folder_name_with_a_bidi_control_is_refused(tmp_path):
    data = make_imagefolder(tmp_path / "d", classes=("cat", "dog\u202egod"), per_class=1)
    with pytest.raises(D3MError, match=r"class 'dog\\u202egod' holds the character U\+202E"):
        ImageFolderSource(data)


def test_a_duplicate_class_id_is_named(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("n01\tcat\nn02\tdog\n# a comment\nn01\tkitten\n")
    with pytest.raises(D3MError, match=r"class id 'n01' is listed twice \(entries 1 and 3\)"):
        read_class_list(f)


# -- 5. image decoding -------------------------------------------------------------------------------------------

def test_sixteen_bit_and_float_images_keep_their_values(tmp_path):
    level = np.full((40, 40), 128 * 257, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(level).save(tmp_path / "g16.png")
    Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    for name in ("g16.png", "f.tif"):
        img = open_image(tmp_path / name, 32)
        assert img.mode == "RGB" and set(np.asarray(img).ravel()) == {128}, name  # not clipped to 255, not black
    Image.fromarray(np.full((40, 40), 3.0, dtype=np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(D3MError, match=r"hdr.tif: a float image with values in \[3, 3\]"):
        open_image(tmp_path / "hdr.tif", 32)


def test_alpha_is_composited_and_alpha_only_content_refused(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[10:30, 10:30, 3] = 255  # a white square on white: the shape is only in the alpha channel
    Image.fromarray(rgba).save(tmp_path / "only_alpha.png")
    with pytest.raises(D3MError, match="only_alpha.png: its content is only in the alpha channel"):
        open_image(tmp_path / "only_alpha.png", 32)
    rgba[..., :3] = 0  # a black square on transparent: over white it shows
    Image.fromarray(rgba).save(tmp_path / "icon.png")
    pixels = np.asarray(open_image(tmp_path / "icon.png", 32))
    assert pixels[20, 20].tolist() == [0, 0, 0] and pixels[0, 0].tolist() == [255, 255, 255]


def test_decoding_is_bounded(tmp_path):
    side = int((MAX_DECODE_PIXELS * 1.5) ** 0.5)
    Image.new("RGB", (side, side), (200, 10, 10)).save(tmp_path / "huge.jpg", quality=50)
    img = open_image(tmp_path / "huge.jpg", 512)  # decoded at 1/8 scale: over the budget only in full
    assert 512 <= min(img.size) < 2 * 512 * 2 and np.asarray(img)[0, 0, 0] > 150
    Image.new("L", (side, side)).save(tmp_path / "huge.png")
    with pytest.raises(D3MError, match=rf"huge.png: {side}x{side} px is over the decode budget of 32 MP"):
        open_image(tmp_path / "huge.png", 512)


def test_every_bad_image_of_a_class_is_listed_at_once(tmp_path):
    data = make_imagefolder(tmp_path / "d", per_class=4)
    for name in ("000.png", "002.png", "003.png"):
        (data / "b_green" / name).write_bytes(b"not a png")
    source = ImageFolderSource(data)
    for run in (lambda: source.scan(1, None, 16, 2), lambda: source.check()):
        with pytest.raises(D3MError, match="class 'b_green': 3 of the 4 images a build reads cannot be used") as info:
            run()
        assert all(f"unreadable image {data / 'b_green' / n}" in str(info.value) for n in ("000.png", "002.png", "003.png"))


# -- 6. option conflicts -------------------------------------------------------------------------------------------

def test_k_above_the_class_count_is_refused_before_any_work(image_folder, tiny_build, tmp_path):
    out = tmp_path / "x.d3m"
    result = CliRunner().invoke(main, [str(image_folder), "-o", str(out), "--model", "d3m/tiny-mnist",
                                       "--teacher", "tiny_teacher:build_teacher", "--k", "9"])
    assert result.exit_code == 1 and "--k 9: the data has 3 classes" in result.stderr, result.output
    assert not out.exists() and not (tmp_path / "x.d3m.work").exists()
    result = merge(tiny_build.workdir, "-o", out, "--k", "9")
    assert result.exit_code == 1 and "--k 9: the data has 3 classes" in result.stderr and not out.exists()


def test_settings_whose_archive_readers_refuse_are_refused_before_any_data(image_folder, tmp_path):
    out = tmp_path / "x.d3m"
    # 300 steps with guidance: 600 UNet evaluations per image, over the readers' 400
    result = CliRunner().invoke(main, [str(image_folder), "-o", str(out), "--model", "d3m/tiny-mnist",
                                       "--teacher", "tiny_teacher:build_teacher", "--steps", "300", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "readers refuse by default: it asks 600 UNet evaluations per image" in result.stderr
    assert "lower --steps, --resolution or --ipc" in result.stderr and "preflight" not in result.stderr
    assert not out.exists() and not (tmp_path / "x.d3m.work").exists()


def test_trust_render_cost_builds_what_default_readers_refuse_and_its_readers_need_the_same_trust(image_folder,
                                                                                                   tmp_path, caplog):
    from d3mfmt import D3MDataset, RenderOptions
    from d3mfmt.cli import inspect_main as inspect
    from d3mfmt.renderable import UNBOUNDED

    out = tmp_path / "grid3.d3m"
    # a 3x3 grid of the built-in model's 32-px patches: 96 px, 24x24 latents, over its readers' 16x16 (64 px)
    args = [str(image_folder), "-o", str(out), "--model", "d3m/tiny-mnist", "--teacher", "tiny_teacher:build_teacher",
            "--grid", "3", "--resolution", "96", "--ipc", "1", "--steps", "2", "--ti-steps", "2", "--device", "cpu"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "asks 576 latent pixels per image" in refused.stderr, refused.output
    assert "build it anyway with --trust-render-cost" in refused.stderr and not out.exists()
    built = CliRunner().invoke(main, [*args, "--trust-render-cost"])
    assert built.exit_code == 0, built.output
    assert "readers refuse it unless told to trust its render cost" in caplog.text
    with pytest.raises(d3mfmt.D3MFormatError, match="576 latent pixels per image"):
        d3mfmt.load_file(out)
    assert d3mfmt.load_file(out, render_limits=UNBOUNDED).manifest.generator.height == 96
    assert CliRunner().invoke(inspect, ["check", str(out)]).exit_code != 0
    assert CliRunner().invoke(inspect, ["check", str(out), "--trust-render-cost"]).exit_code == 0
    ds = D3MDataset(out, cache_dir=tmp_path / "cache", render=RenderOptions(device="cpu", limits=UNBOUNDED))
    image, soft, _ = ds[0]
    assert len(ds) == 3 * 9 and image.shape == (3, 32, 32) and abs(float(soft.sum()) - 1) < 1e-3


def test_render_limits_tighter_than_a_default_readers_stop_the_build_before_any_data(image_folder, tmp_path):
    from builder.labeloptions import label_encoding
    from builder.pipeline import build_archive
    from builder.settings import BuildSettings, RunOptions
    from d3mfmt.renderable import RenderLimits

    # 20 guided DDIM steps: 40 UNet evaluations per image, within a default reader's 400, over these 10
    settings = BuildSettings(model="d3m/tiny-mnist", teacher="tiny_teacher:build_teacher", ipc=1)
    out = tmp_path / "x.d3m"
    with pytest.raises(D3MError, match="asks 40 UNet evaluations per image.*over the build's render limits"):
        build_archive(ImageFolderSource(image_folder), settings, out, labels=label_encoding(),
                      run=RunOptions(device="cpu", progress=False, render_limits=RenderLimits(evaluations=10)))
    assert not out.exists() and not (tmp_path / "x.d3m.work" / "preflight.json").exists()


# -- 7. guards that see pile-ups -----------------------------------------------------------------------------------

def one_hot(predictions, num_classes=5):
    return np.eye(num_classes)[np.asarray(predictions)]


def test_a_class_the_teachers_predictions_pile_up_on_is_low():
    # every class renders the same (digits, say): the teacher takes most patches for 'triangle' (2) or 'star' (3)
    preds = [[2, 2, 3, 0], [2, 3, 3, 2], [2, 2, 2, 3], [3, 3, 2, 2], [2, 3, 4, 2]]
    probs = [one_hot(p) for p in preds]
    regen = [float((p.argmax(1) == c).mean()) for c, p in enumerate(probs)]
    precision = regenerated_precision(probs)
    assert regen[2] == 0.75 and regen[3] == 0.5  # recall alone passes them
    assert precision[2] == pytest.approx(3 / 11) and precision[3] == pytest.approx(2 / 7) and precision[1] is None
    assert domain_problems([1.0] * 5, regen) == [0, 1, 4]
    assert domain_problems([1.0] * 5, regen, precision) == [0, 1, 2, 3, 4]
    classes = [ClassInfo(str(c), n) for c, n in enumerate(["circle", "square", "triangle", "star", "heart"])]
    lines = archive_warnings(classes, [1.0] * 5, regen, precision)
    assert "near chance for 5 classes (20.0%; flagged under 40.0%)" in lines[0]
    assert "class 'triangle': the teacher agrees with the class on 75% of regenerated patches (real patches: " \
           "100%), and only 27% of the regenerated patches it takes for this class are this class's" in "\n".join(lines)


def test_near_chance_limits():
    assert [round(near_chance_limit(c), 4) for c in (2, 3, 5, 10, 1000)] == [0.75, 0.6667, 0.4, 0.2, 0.002]
    assert near_chance(0.205, 5) and not near_chance(0.5, 5) and not near_chance(1.0, 1)


def test_inspect_marks_pile_ups_and_near_chance_like_the_builder():
    archive = make_archive(num_classes=3)
    agreement = {"c0": {"regenerated": 0.9, "real": 1.0, "precision": 0.3}, "c1": {"regenerated": 0.1},
                 "c2": {"regenerated": 0.0}}
    archive = replace(archive, manifest=replace(archive.manifest, build={"agreement": agreement}))
    summary = agreement_summary(d3mfmt.load(d3mfmt.save(archive)))
    assert [r["id"] for r in summary["low"]] == ["c0", "c1", "c2"] and summary["near_chance"]


def test_the_tiny_build_records_precision(tiny_build):
    build = d3mfmt.load_file(tiny_build.out).manifest.build
    probs = [w.load_class(c)[0]["probs"] for w in [Workdir(tiny_build.workdir, create=False)] for c in range(3)]
    expected = regenerated_precision(probs)
    assert [build["agreement"][c].get("precision") for c in ("a_red", "b_green", "c_blue")] == \
        [None if p is None else round(p, 4) for p in expected]


# -- 8. the README's teacher example runs with what `make setup` installs ----------------------------------------

def test_the_example_teacher_needs_only_torch(tmp_path, monkeypatch):
    import ast
    import importlib.util

    from builder.teachers import check_teacher_width, resolve_teacher

    path = ROOT / "examples" / "my_teachers.py"
    imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in (n.names if isinstance(n, ast.Import) else
                                                                        [ast.alias(n.module or "")])}
    assert imported == {"safetensors", "torch"}  # no torchvision: installing it would replace the pinned torch
    spec = importlib.util.spec_from_file_location("my_teachers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "my_teachers", module)
    safetensors.torch.save_file(module.SmallCNN(100).state_dict(), tmp_path / module.WEIGHTS)
    teacher, name = resolve_teacher("my_teachers:small_cnn_in100")
    check_teacher_width(teacher, 100, 256, "cpu")
    assert teacher(torch.rand(2, 3, 256, 256)).shape == (2, 100) and name == "my_teachers:small_cnn_in100"


def test_d3m_build_names_no_library_switch_for_an_uncached_model(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from builder.model import load_build_model
    from builder.settings import BuildSettings

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(D3MError, match=r"not in the local Hugging Face cache .*download it once with `hf download "
                                       r"org/not-cached`") as info:
        load_build_model(BuildSettings(model="org/not-cached", teacher="t"), "cpu", "float32")
    assert "allow_download" not in str(info.value)


def test_only_regular_files_are_read_as_images(tmp_path):
    import os

    data = make_imagefolder(tmp_path / "d", per_class=2)
    (data / "a_red" / "folder.png").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(data / "a_red" / "pipe.jpg")  # opening it would wait forever for a writer
    source = ImageFolderSource(data)
    source.check()
    assert [p.name for p in source.files(0)] == ["000.png", "001.png"]
