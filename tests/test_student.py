"""examples/train_student.py: protocols named, held-out images labelled by the archive's classes, clear errors."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROOT = EXAMPLES.parent
sys.path.insert(0, str(EXAMPLES))

from evaluation.protocols import TrainConfig, evaluate, train_student  # noqa: E402

import d3mfmt  # noqa: E402
from d3mfmt import D3MError, SourceInfo  # noqa: E402


def run_script(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(EXAMPLES / "train_student.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd)


def test_every_protocol_trains_through_a_dataloader_and_the_loss_falls(tiny_archive_path, tmp_path):
    from tiny_teacher import ChannelTeacher

    from d3mfmt import D3MDataset

    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path)
    cfg = TrainConfig(steps=40, batch=16)
    for protocol in ("stored", "teacher", "hard"):
        losses = []
        model = train_student(ds, protocol, "mlp", cfg, ChannelTeacher(3), losses=losses)
        assert len(losses) == 40 and sum(losses[-8:]) < sum(losses[:8]), protocol
        assert not model.training
    with pytest.raises(D3MError, match="needs a teacher"):
        train_student(ds, "teacher", "mlp", cfg)
    with pytest.raises(D3MError, match="unknown protocol"):
        train_student(ds, "online", "mlp", cfg)


def test_training_is_deterministic_for_a_seed(tiny_archive_path, tmp_path):
    from d3mfmt import D3MDataset

    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path)
    x = torch.rand(6, 3, 16, 16)
    outs = [train_student(ds, "hard", "convnet3", TrainConfig(steps=5, batch=8, seed=s))(x) for s in (3, 3, 4)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_cli_names_the_protocol_and_scores_on_eval_folders(tiny_archive_path, tmp_path):
    from tiny_teacher import make_imagefolder

    archive = d3mfmt.load_file(tiny_archive_path)
    names = [c.name for c in archive.manifest.dataset.classes]  # "class 0".. : folders named by class name
    val = make_imagefolder(tmp_path / "val", classes=names, per_class=2)
    out = run_script(tiny_archive_path, "--steps", "5", "--eval", val, "--cache-dir", tmp_path / "c")
    assert out.returncode == 0, out.stderr
    assert "held-out accuracy" in out.stdout and "protocol stored" in out.stdout
    bad = run_script(tiny_archive_path, "--teacher", "mnist-cnn")
    assert bad.returncode == 2 and "--teacher is used only by --protocol teacher" in bad.stderr


def test_cli_refuses_a_non_mnist_archive_without_eval(tiny_archive_path, tmp_path):
    # the tiny archive names no source; a copy names an ImageFolder source: neither may be scored on MNIST
    other = tmp_path / "pets.d3m"
    a = d3mfmt.load_file(tiny_archive_path)
    ds = replace(a.manifest.dataset, source=SourceInfo("imagefolder:pets", "sha256:" + "0" * 64, None))
    d3mfmt.save_file(replace(a, manifest=replace(a.manifest, dataset=ds)), other)
    for path, why in ((tiny_archive_path, "names no source dataset"), (other, "built from 'imagefolder:pets'")):
        out = run_script(path, "--steps", "2", "--cache-dir", tmp_path / "c")
        assert out.returncode == 1, out.stdout
        assert why in out.stderr and "Pass --eval DIR" in out.stderr and "Traceback" not in out.stderr
        assert "held-out accuracy" not in out.stdout


def test_evaluate_counts_correct_predictions():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0 + 1].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 1.0, 0]]).view(4, 3, 1, 1)
    assert evaluate(model, x, torch.tensor([0, 1, 1, 1])) == 0.75
