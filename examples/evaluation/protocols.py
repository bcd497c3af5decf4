"""The three training protocols and the one training loop.

A dataset item is ``(image [3, H, W] in [0, 1], soft label [C], class index)``,
what ``D3MDataset`` yields; real-image baselines are ``TensorDataset``s of the
same three columns. Every dataset is read through ``DataLoader`` (shuffled,
seeded), as a user trains.

- ``stored`` (D3M's regime; DD-Ranking's 'S'): the stored soft label of each
  item, no augmentation, loss ``KL(p_T || q_T) * T^2`` with ``p_T`` the stored
  label re-tempered to T (``softmax(log p / T)``) and ``q_T`` the student's
  ``softmax(logits / T)``;
- ``teacher`` (the RDED / SRe2L regime; DD-Ranking's 'M'): random resized
  crops of every batch, the teacher's ``softmax(logits / T)`` on exactly those
  crops as the target, the same KL loss;
- ``hard``: random resized crops, cross-entropy on the class index.

The budget is a fixed number of optimisation steps (not epochs), the same for
every dataset: AdamW, cosine decay to 0, accuracy of the final model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from d3mfmt import D3MError

from .students import make_student


@dataclass(frozen=True)
class TrainConfig:
    """The student recipe (fixed in advance for every method and student; nothing is tuned on the test split)."""

    steps: int = 300  # optimisation steps: the training budget
    batch: int = 64  # images per step (the whole dataset when it is smaller)
    lr: float = 2e-3  # AdamW, cosine decay to 0 over ``steps``
    weight_decay: float = 0.01
    temperature: float = 4.0  # KD temperature T of the soft-label protocols
    seed: int = 0  # student initialisation, batch order and augmentation


@dataclass(frozen=True)
class Protocol:
    name: str
    targets: str  # "stored", "teacher" or "hard"
    augment: bool
    description: str


PROTOCOLS = {
    "stored": Protocol("stored", "stored", False, "stored soft labels, no augmentation, KD at T"),
    "teacher": Protocol("teacher", "teacher", True, "random resized crops, teacher soft labels on each crop, KD at T"),
    "hard": Protocol("hard", "hard", True, "random resized crops, one-hot class labels, cross-entropy"),
}

CROP_SCALE = (0.5, 1.0)  # crop area as a fraction of the image (the builder's patch crops use the same range)
CROP_RATIO = (3 / 4, 4 / 3)  # crop aspect ratio; no flips: digits are not mirror-symmetric


def crop_boxes(n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` random crop boxes ``(w, h, cx, cy)``: width and height as fractions of the image side (area ~
    U(CROP_SCALE), log-aspect ~ U(log CROP_RATIO)), centre in [-1, 1] coordinates with the box inside the image."""
    area = torch.empty(n).uniform_(*CROP_SCALE, generator=g)
    aspect = torch.exp(torch.empty(n).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=g))
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    return w, h, cx, cy


def random_resized_crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random resized crop per image (``crop_boxes``), resampled to the input size."""
    n = len(x)
    w, h, cx, cy = crop_boxes(n, g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def check_protocol(protocol: str, teacher: nn.Module | None) -> Protocol:
    if protocol not in PROTOCOLS:
        raise D3MError(f"unknown protocol {protocol!r}; use one of {list(PROTOCOLS)}")
    if PROTOCOLS[protocol].targets == "teacher" and teacher is None:
        raise D3MError("protocol 'teacher' needs a teacher (--teacher NAME or module:function)")
    return PROTOCOLS[protocol]


def endless_batches(dataset, batch: int, seed: int, num_workers: int = 0):
    """Shuffled ``(images, soft labels, classes)`` batches from ``DataLoader(dataset)``, epoch after epoch."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=min(batch, len(dataset)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    while True:
        for images, soft, classes in loader:
            yield images, soft, classes


def train_student(dataset, protocol: str, student: str = "convnet3", cfg: TrainConfig = TrainConfig(),
                  teacher: nn.Module | None = None, *, num_workers: int = 0, losses: list | None = None) -> nn.Module:
    """Train a fresh student on ``dataset`` under ``protocol``; returns it in eval mode.

    Args:
        dataset: items ``(image, soft label, class index)``, e.g. ``D3MDataset(path)``.
        protocol: ``"stored"``, ``"teacher"`` or ``"hard"`` (see the module docstring).
        student: a name in ``students.STUDENTS`` or ``module:function``.
        teacher: the frozen teacher, required by ``"teacher"``.
        losses: when given, each step's loss is appended.

    Example:
        >>> model = train_student(D3MDataset("mnist_ipc10.d3m"), "stored")    # doctest: +SKIP
    """
    # 1. check inputs
    proto = check_protocol(protocol, teacher)
    T = cfg.temperature
    # 2. student, optimiser, schedule; the class count and side come from the first batch
    torch.manual_seed(cfg.seed)
    crops = torch.Generator().manual_seed(10_000 + cfg.seed)
    stream = endless_batches(dataset, cfg.batch, cfg.seed, num_workers)
    x, p, y = next(stream)
    model = make_student(student, p.shape[-1], x.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    model.train()
    # 3. the fixed budget of steps
    for step in range(cfg.steps):
        if step:
            x, p, y = next(stream)
        if proto.augment:
            x = random_resized_crop(x, crops)
        logits = model(x)
        if proto.targets == "hard":
            loss = F.cross_entropy(logits, y)
        else:
            if proto.targets == "teacher":
                with torch.no_grad():
                    target = F.softmax(teacher(x) / T, dim=1)
            else:
                target = F.softmax(torch.log(p.clamp_min(1e-12)) / T, dim=1)
            loss = F.kl_div(F.log_softmax(logits / T, dim=1), target, reduction="batchmean") * T * T
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if losses is not None:
            losses.append(float(loss.detach()))
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)``, as a fraction."""
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(batch), labels.split(batch)))
    return correct / len(labels)
