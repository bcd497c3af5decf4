"""examples/evaluation: held-out labels by class id/name, DD-Ranking's formulas, students, baselines, the report."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from evaluation import metrics  # noqa: E402
from evaluation.baselines import RealSet, random_subset_indices  # noqa: E402
from evaluation.builder_adapter import mnist_source_info  # noqa: E402
from evaluation.heldout import builtin_mnist_problem, heldout_for, match_folders  # noqa: E402
from evaluation.protocols import CROP_SCALE, crop_boxes, evaluate, random_resized_crop  # noqa: E402
from evaluation.report import Row, budget_table, ddranking  # noqa: E402
from evaluation.students import STUDENTS, make_student  # noqa: E402

import d3mfmt  # noqa: E402
from d3mfmt import ClassInfo, D3MError, SourceInfo  # noqa: E402


# -- held-out images carry the archive's class indices -------------------------------------------

@pytest.fixture(scope="module")
def permuted_archive(tiny_model, tmp_path_factory):
    """A real build whose --classes order (c_blue, a_red, b_green) is not the folders' sorted order."""
    from tiny_teacher import make_imagefolder

    from builder.cli import main

    root = tmp_path_factory.mktemp("permuted")
    data = make_imagefolder(root / "train")
    (root / "classes.txt").write_text("c_blue\na_red\nb_green\n")
    out = root / "x.d3m"
    result = CliRunner().invoke(main, [
        str(data), "-o", str(out), "--classes", str(root / "classes.txt"), "--model", str(tiny_model),
        "--teacher", "tiny_teacher:build_permuted_teacher", "--ipc", "1", "--grid", "2", "--steps", "2",
        "--guidance", "2.0", "--template", "a photo of {token}", "--ti-steps", "2", "--ti-batch", "2",
        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def test_permuted_classes_archive_is_scored_in_its_own_class_order(permuted_archive, tmp_path):
    from tiny_teacher import build_permuted_teacher, make_imagefolder

    manifest = d3mfmt.load_file(permuted_archive).manifest
    assert [c.id for c in manifest.dataset.classes] == ["c_blue", "a_red", "b_green"]
    val = make_imagefolder(tmp_path / "val", per_class=4)  # folders a_red, b_green, c_blue (sorted differently)
    heldout = heldout_for(manifest, val, 16)
    assert heldout.images.shape == (12, 3, 16, 16)
    teacher = build_permuted_teacher()  # 100 % accurate in the archive's order (the build's guard checked it)
    assert evaluate(teacher, heldout.images, heldout.labels) == 1.0
    # labelling each folder by its position in sorted order (the old script's rule) scores the same teacher 0
    sorted_order = torch.tensor([sorted(["a_red", "b_green", "c_blue"]).index(c.id) for c in manifest.dataset.classes])
    assert sorted_order.tolist() == [2, 0, 1]
    sorted_order = sorted_order.repeat_interleave(4)
    assert evaluate(teacher, heldout.images, sorted_order) == 0.0


def test_folders_match_by_id_else_name_and_every_mismatch_is_named():
    classes = [ClassInfo("n01", "cat"), ClassInfo("n02", "dog"), ClassInfo("n03", "owl")]
    assert match_folders(classes, ["dog", "n01", "n03"]) == ["n01", "dog", "n03"]
    with pytest.raises(D3MError) as err:
        match_folders(classes, ["n01", "n02", "snake", "zebra"])
    text = str(err.value)
    assert "'n03' ('owl')" in text and "'snake', 'zebra'" in text and "by its id or name" in text
    with pytest.raises(D3MError, match="match more than one archive class"):
        match_folders([ClassInfo("a", "b"), ClassInfo("c", "a")], ["a"])


def test_only_the_builtin_mnist_train_split_has_a_default_heldout_set():
    from d3mfmt.mnist import MNIST_CLASS_NAMES

    base = d3mfmt.load_file("spec/vectors/topk.d3m").manifest
    digits = tuple(ClassInfo(str(i), n) for i, n in enumerate(MNIST_CLASS_NAMES))
    train, test = mnist_source_info("train"), mnist_source_info("test")

    def with_source(source, classes=digits):
        return replace(base, dataset=replace(base.dataset, classes=classes, source=source))

    assert builtin_mnist_problem(with_source(train)) is None
    heldout = heldout_for(with_source(train), None, 32)
    assert heldout.images.shape == (1000, 3, 32, 32) and torch.bincount(heldout.labels).tolist() == [100] * 10
    cases = {
        "names no source": with_source(None),
        "built from 'imagefolder:pets'": with_source(SourceInfo("imagefolder:pets", train.fingerprint)),
        "fingerprint differs": with_source(replace(train, fingerprint="sha256:" + "0" * 64)),
        "test split itself": with_source(test),
        "are not the digits 0-9 in order": with_source(train, digits[::-1]),
    }
    for why, manifest in cases.items():
        with pytest.raises(D3MError, match="Pass --eval DIR") as err:
            heldout_for(manifest, None, 32)
        assert why in str(err.value)


# -- DD-Ranking's metrics on hand-computed numbers -------------------------------------------------

def test_ddranking_formulas_on_hand_computed_numbers():
    assert metrics.hard_label_recovery(0.97, 0.90) == pytest.approx(0.07)
    assert metrics.improvement_over_random(0.94, 0.92) == pytest.approx(0.02)
    # a = 0.5 * 0.02 - 0.5 * 0.07 = -0.025; (e^-0.025 - e^-1) / (e - e^-1) = 0.6074305 / 2.3504024
    assert metrics.label_robust_score(0.07, 0.02) == pytest.approx(0.2584368, abs=1e-7)
    assert metrics.label_robust_score(0.0, 0.0) == pytest.approx(0.2689414, abs=1e-7)  # (1 - 1/e) / (e - 1/e)
    assert metrics.label_robust_score(-1.0, 1.0) == pytest.approx(1.0)  # a = 1
    assert metrics.label_robust_score(1.0, -1.0) == pytest.approx(0.0)  # a = -1
    assert metrics.label_robust_score(0.1, 0.3, w=1.0) == pytest.approx((math.exp(0.3) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert metrics.mean_std([0.9, 0.8, 0.7]) == pytest.approx((0.8, math.sqrt(2 / 3) / 10))


def test_ddranking_table_pairs_seeds():
    rows = [Row("full", None, "hard", "convnet3", 0, (0, 1), (0.97, 0.95)),
            Row("d3m", 10, "hard", "convnet3", 0, (0, 1), (0.90, 0.91)),
            Row("d3m", 10, "stored", "convnet3", 0, (0, 1), (0.94, 0.93)),
            Row("random", 10, "stored", "convnet3", 0, (0, 1), (0.92, 0.92)),
            Row("random", 10, "hard", "convnet3", 0, (0, 1), (0.88, 0.86))]
    lines, records = ddranking(rows)
    (rec,) = records
    assert rec["hlr"] == pytest.approx([0.07, 0.04])
    assert rec["ior"]["stored"] == pytest.approx([0.02, 0.01]) and rec["ior"]["hard"] == pytest.approx([0.02, 0.05])
    assert "teacher" not in rec["ior"]
    assert rec["lrs"]["stored"][0] == pytest.approx(0.2584368, abs=1e-7)
    assert "| .d3m archive | 10 | 0.055 ± 0.015 | 0.015 ± 0.005 |" in lines[2]


def test_budget_table_takes_the_best_row_that_fits():
    rows = [Row("d3m", k, "stored", "convnet3", b, (0,), (a,)) for k, b, a in ((1, 4000, 0.6), (10, 9000, 0.94), (50, 40000, 0.93))]
    lines, records = budget_table(rows, (3000, 5000, 50000))
    best = {r["budget"]: r["best"] for r in records if (r["method"], r["protocol"]) == ("d3m", "stored")}
    assert best[3000] is None and best[5000]["ipc"] == 1 and best[50000]["ipc"] == 10
    assert lines[2].startswith("| .d3m archive | stored | — | 60.0 ± 0.0 (IPC 1, 4,000 B) | 94.0")


# -- students, augmentation, real sets ---------------------------------------------------------------

def test_students_map_images_to_logits():
    x = torch.rand(2, 3, 32, 32)
    for name in STUDENTS:
        assert make_student(name, 10, 32)(x).shape == (2, 10), name
    assert make_student("resnet8", 3, 16)(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    with pytest.raises(D3MError, match="divisible by 4"):
        make_student("vit", 10, 30)
    with pytest.raises(D3MError, match="unknown student"):
        make_student("resnet50", 10, 32)


def test_random_resized_crop_is_seeded_and_stays_inside_the_image():
    x = torch.rand(8, 3, 32, 32)
    a, b = (random_resized_crop(x, torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, random_resized_crop(x, torch.Generator().manual_seed(2)))
    w, h, cx, cy = crop_boxes(10_000, torch.Generator().manual_seed(0))  # every box inside the image
    assert bool(((cx.abs() + w <= 1 + 1e-6) & (cy.abs() + h <= 1 + 1e-6)).all())
    area = w * h  # the documented area range (where the side clamp to 1 does not cut it)
    assert area.min() >= CROP_SCALE[0] - 1e-6 and area.max() <= CROP_SCALE[1] + 1e-6 and area.std() > 0.1


def test_random_subsets_and_real_sets_round_trip(tmp_path):
    labels = np.repeat(np.arange(4), 10)
    idx = random_subset_indices(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3] * 4 and len(set(idx)) == 12
    assert not np.array_equal(idx, random_subset_indices(labels, 3, seed=1))
    real = RealSet(np.zeros((2, 32, 32), np.uint8), np.full((2, 4), 0.25, np.float32), np.array([0, 3]), 10, 20, 2)
    real.save(tmp_path / "r.npz")
    back = RealSet.load(tmp_path / "r.npz")
    x, p, y = back.dataset()[1]
    assert x.shape == (3, 32, 32) and p.sum() == 1 and int(y) == 3 and back.image_bytes == 10
    assert metrics.png_bytes(np.zeros((3, 28, 28), np.uint8)) > 0


@pytest.mark.slow
def test_quick_benchmark_writes_every_table(tmp_path):
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    run = subprocess.run([sys.executable, str(EXAMPLES / "benchmark.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "benchmark.json").read_text())
    seen = {(r["method"], r["protocol"], r["student"]) for r in doc["rows"]}
    for method in ("d3m", "word", "random", "rded"):
        assert {(method, p, "convnet3") for p in ("stored", "teacher", "hard")} <= seen, method
        assert {(method, "stored", s) for s in ("resnet8", "mlp", "vit")} <= seen, method
    assert {("full", "hard", "convnet3"), ("grid1", "stored", "convnet3"), ("grid3", "teacher", "convnet3")} <= seen
    assert doc["incomplete"] == [] and len(doc["rows"]) == 38  # the quick plan's 38 (method, IPC, protocol, student) rows
    assert all(len(r["accs"]) == 2 and 0 <= r["mean"] <= 1 and r["bytes"] > 0 for r in doc["rows"])
    assert doc["ddranking"] and doc["storage"]["generator_bytes"] > 1_000_000
    md = (tmp_path / "benchmark.md").read_text()
    assert "Cross-architecture" in md and "Best within a byte budget" in md and "DD-Ranking" in md
