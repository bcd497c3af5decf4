"""examples/train_student.py: a few steps from a tiny archive lower the loss and evaluation runs."""

import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from train_student import TrainConfig, batches, convnet, evaluate, train, train_on  # noqa: E402


def test_student_loss_falls_on_archive_patches(tiny_archive_path, tmp_path):
    from d3mfmt import D3MDataset

    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path)
    items = ds.__getitems__(range(len(ds)))
    images, targets = torch.stack([x for x, _, _ in items]), torch.stack([p for _, p, _ in items])
    assert images.shape == (48, 3, 16, 16) and targets.shape == (48, 3)
    eval_set = (images, targets.argmax(1))
    for loss_kind in ("kd", "ce"):
        losses = []
        acc = train(images, targets, eval_set, TrainConfig(steps=60, batch=16, loss=loss_kind), progress=False,
                    make_student=lambda n: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, n)),
                    losses=losses)
        assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10]), loss_kind
        assert 0.0 <= acc <= 1.0


def test_online_teacher_protocol_and_convnet_shapes():
    x = torch.rand(8, 3, 32, 32)
    teacher = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10))
    losses = []
    acc = train(x, torch.full((8, 10), 0.1), (x, torch.zeros(8, dtype=torch.long)),
                TrainConfig(steps=20, batch=8, augment=True), teacher=teacher, progress=False, losses=losses)
    assert len(losses) == 20 and 0.0 <= acc <= 1.0
    assert convnet(10)(x).shape == (8, 10)
    assert evaluate(convnet(10), x, torch.zeros(8, dtype=torch.long)) in {k / 8 for k in range(9)}


def test_cli_names_the_protocol(tiny_archive_path, tmp_path):
    import os

    # the tiny archive has 3 classes: evaluate on an ImageFolder of 3 classes
    from tiny_teacher import make_imagefolder

    val = make_imagefolder(tmp_path / "val", per_class=2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, str(EXAMPLES / "train_student.py"), str(tiny_archive_path), "--steps", "5",
                          "--eval", str(val), "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "held-out accuracy" in out.stdout and "protocol S (stored labels, kd)" in out.stdout


def test_training_reads_d3mdataset_through_a_dataloader(tiny_archive_path, tmp_path):
    import numpy as np

    from d3mfmt import D3MDataset

    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path, target_transform=lambda p: 2 * p)
    stream = batches(ds, TrainConfig(batch=16, seed=0))
    epoch = [next(stream) for _ in range(len(ds) // 16)]  # 48 patches: one shuffled epoch, every patch once
    labels = torch.cat([p for _, p in epoch]).numpy()
    stored = 2 * ds.archive.labels.dense()
    assert labels.shape == stored.shape and np.allclose(labels.sum(1), 2)
    assert np.array_equal(np.unique(labels, axis=0), np.unique(stored, axis=0))
    assert torch.cat([x for x, _ in epoch]).shape == (48, 3, 16, 16)
    losses = []
    acc = train_on(batches(D3MDataset(tiny_archive_path, cache_dir=tmp_path), TrainConfig(batch=16)),
                   (torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)), TrainConfig(steps=30, batch=16),
                   make_student=lambda n: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(768, n)),
                   progress=False, losses=losses)
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]) and 0 <= acc <= 1
