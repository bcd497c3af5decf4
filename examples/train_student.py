"""Train a student from a .d3m archive and evaluate it on real held-out images.

Usage:
    python examples/train_student.py mnist_ipc10.d3m                        # stored soft labels ('S')
    python examples/train_student.py mnist_ipc10.d3m --teacher mnist-cnn    # online relabelling ('M')
    python examples/train_student.py x.d3m --eval /data/val --student mymod:make_net

Label protocols (DD-Ranking's names, printed with every result):
  S  stored labels only: KL(stored soft label at T || student at T) * T^2, or
     cross-entropy on the class with --loss ce; no augmentation by default
     (the paper's protocol: one stored label per patch);
  M  an online teacher relabels every augmented batch (--teacher).

The budget is a number of optimisation steps (--steps), not epochs, so
datasets of different sizes get the same training. AdamW with a cosine
schedule; evaluation on the built-in MNIST test split unless --eval names an
ImageFolder (class folders in the archive's class order).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no notes about torchvision at import


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500  # optimisation steps (the training budget)
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    loss: str = "kd"  # "kd" (soft labels) or "ce" (hard labels)
    temperature: float = 4.0  # KD temperature
    augment: bool = False
    seed: int = 0


def convnet(num_classes: int = 10, width: int = 32) -> nn.Module:
    """ConvNet-3 (the dataset-distillation standard): 3 x [conv-instancenorm-relu-avgpool], linear."""
    layers, c_in = [], 3
    for _ in range(3):
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(), nn.AvgPool2d(2)]
        c_in = width
    # 32-px input is 4x4 here; other sizes are pooled to 4x4 so any patch size works
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 4 * 4, num_classes))


def load_factory(spec: str):
    """``module:function`` -> the callable."""
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random scale (0.8-1.2) and shift (up to 4 px) per image; no flips (digits are not symmetric)."""
    n = len(x)
    scale = torch.empty(n).uniform_(0.8, 1.2, generator=g)
    shift = torch.empty(n, 2).uniform_(-0.25, 0.25, generator=g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def mnist_eval_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out MNIST split as 32-px RGB tensors in [0, 1]."""
    from d3mfmt.mnist import load_mnist, to_rgb32

    x, y = load_mnist("test")
    return to_rgb32(x), torch.from_numpy(y)


def imagefolder_eval_set(root: str, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pathlib import Path

    from builder.sources import ImageFolderSource

    src = ImageFolderSource(Path(root))
    xs, ys = [], []
    for c in range(len(src.class_list)):
        images = src.images(c, side)
        xs.append(images)
        ys.append(torch.full((len(images),), c))
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(500), labels.split(500)))
    model.train()
    return correct / len(labels)


def batches(dataset, cfg: TrainConfig, num_workers: int = 0):
    """Endless shuffled batches ``(images, soft labels)`` from any dataset whose items start with those two.

    The path users copy: ``DataLoader(D3MDataset(path), batch_size, shuffle=True, num_workers)``.
    """
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=min(cfg.batch, len(dataset)), shuffle=True, generator=g,
                        num_workers=num_workers, persistent_workers=num_workers > 0, drop_last=True)
    while True:
        for batch in loader:
            yield batch[0], batch[1]


def train_on(data, eval_set, cfg: TrainConfig, make_student=convnet, teacher: nn.Module | None = None,
             progress: bool = True, losses: list | None = None) -> float:
    """Train a fresh student on ``data`` (an iterator of (images, probabilities) batches); return eval accuracy.

    With ``teacher``, targets are recomputed by the teacher on every (augmented) batch (protocol 'M').
    Each step's loss is appended to ``losses`` when given.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    student = None
    T = cfg.temperature
    for step in tqdm(range(cfg.steps), desc="student", unit="step", disable=not progress, leave=False):
        x, p = next(data)
        if student is None:  # the class count comes with the first batch
            student = make_student(p.shape[-1])
            opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
        if cfg.augment:
            x = augment(x, g)
        if teacher is not None:
            with torch.no_grad():
                p = F.softmax(teacher(x) / T, dim=1)
        elif cfg.loss == "kd":
            p = F.softmax(torch.log(p.clamp_min(1e-12)) / T, dim=1)
        logits = student(x)
        if cfg.loss == "ce" and teacher is None:
            loss = F.cross_entropy(logits, p.argmax(1))
        else:
            loss = F.kl_div(F.log_softmax(logits / T, dim=1), p, reduction="batchmean") * T * T
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if losses is not None:
            losses.append(float(loss.detach()))
    return evaluate(student, *eval_set)


def train(images: torch.Tensor, targets: torch.Tensor, eval_set, cfg: TrainConfig, make_student=convnet,
          teacher: nn.Module | None = None, progress: bool = True, losses: list | None = None) -> float:
    """:func:`train_on` for tensors already in memory (baselines such as random real images + soft labels)."""
    from torch.utils.data import TensorDataset

    return train_on(batches(TensorDataset(images, targets), cfg), eval_set, cfg, make_student, teacher, progress, losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archive")
    ap.add_argument("--student", help="module:function returning an nn.Module(num_classes) [default: ConvNet-3]")
    ap.add_argument("--teacher", help="built-in teacher name or module:function: relabel each batch online ('M')")
    ap.add_argument("--eval", help="ImageFolder of held-out images [default: the MNIST test split]")
    ap.add_argument("--loss", choices=["kd", "ce"], default="kd")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--temperature", type=float, default=TrainConfig.temperature)
    ap.add_argument("--augment", action="store_true", help="random scale/shift (default on with --teacher)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (they render and read the cache)")
    args = ap.parse_args()

    from d3mfmt import D3MDataset

    dataset = D3MDataset(args.archive, cache_dir=args.cache_dir)  # renders on first use, then reads its cache
    side = dataset.archive.manifest.generator.height // dataset.grid
    eval_set = imagefolder_eval_set(args.eval, side) if args.eval else mnist_eval_set()
    teacher = None
    if args.teacher:
        from builder.teachers import resolve_teacher

        teacher, _ = resolve_teacher(args.teacher)
    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, loss=args.loss, temperature=args.temperature,
                      augment=args.augment or teacher is not None, seed=args.seed)
    make_student = load_factory(args.student) if args.student else convnet
    protocol = "M (online teacher)" if teacher is not None else f"S (stored labels, {args.loss})"
    print(f"{len(dataset)} patches, protocol {protocol}, {cfg.steps} steps of {cfg.batch}", file=sys.stderr)
    acc = train_on(batches(dataset, cfg, args.workers), eval_set, cfg, make_student, teacher)
    print(f"held-out accuracy {100 * acc:.2f}%  protocol {protocol}  archive {args.archive}")


if __name__ == "__main__":
    main()
