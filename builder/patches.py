"""Patch selection (RDED-style) and collages.

For each real image, ``n_crops`` random resized crops go through the teacher;
the crop with the lowest cross-entropy on the image's class is that image's
patch ("most informative" in D3M's and RDED's sense: the teacher is surest of
the class). Per class the ``keep`` lowest-loss patches survive and are tiled
``grid x grid`` into collages, the images textual inversion learns from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchSettings:
    """Patch selection: how many real images and random crops the teacher scores per class."""

    n_crops: int = 5  # random resized crops scored per real image (RDED: 5)
    scale: tuple[float, float] = (0.5, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    max_images: int = 300  # real images per class considered (RDED: 300)
    batch: int = 256  # crops per teacher call


def random_resized_crops(images: torch.Tensor, n_crops: int, out_side: int, scale, ratio, g: torch.Generator) -> torch.Tensor:
    """``n_crops`` crops per image (area ~U(scale), log-aspect ~U(log ratio)), resized: ``[N, n_crops, 3, s, s]``."""
    n, _, h, w = images.shape
    area = torch.empty(n, n_crops).uniform_(*scale, generator=g) * h * w
    log_r = torch.empty(n, n_crops).uniform_(*torch.log(torch.tensor(ratio)).tolist(), generator=g)
    aspect = torch.exp(log_r)
    ch = torch.sqrt(area / aspect).round().clamp(1, h).long()
    cw = torch.sqrt(area * aspect).round().clamp(1, w).long()
    y0 = (torch.rand(n, n_crops, generator=g) * (h - ch + 1)).floor().long()
    x0 = (torch.rand(n, n_crops, generator=g) * (w - cw + 1)).floor().long()
    out = torch.empty(n, n_crops, images.shape[1], out_side, out_side)
    for a in range(n):
        for b in range(n_crops):
            crop = images[a : a + 1, :, y0[a, b] : y0[a, b] + ch[a, b], x0[a, b] : x0[a, b] + cw[a, b]]
            out[a, b] = F.interpolate(crop, size=(out_side, out_side), mode="bilinear", align_corners=False, antialias=True)[0]
    return out


@torch.no_grad()
def teacher_losses(teacher, patches: torch.Tensor, c: int, batch: int, device: str) -> torch.Tensor:
    """Cross-entropy of class ``c`` for each patch ``[M, 3, s, s]`` -> ``[M]``."""
    losses = []
    for chunk in patches.split(batch):
        logits = teacher(chunk.to(device)).float()
        target = torch.full((len(chunk),), c, dtype=torch.long, device=logits.device)
        losses.append(F.cross_entropy(logits, target, reduction="none").cpu())
    return torch.cat(losses)


def select_patches(images: torch.Tensor, c: int, teacher, keep: int, side: int, settings: PatchSettings,
                   g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` most informative patches of class ``c``: (patches ``[keep, 3, side, side]``, their losses).

    If the class has fewer real images than ``keep``, the best crops are
    reused in order (a class with 3 images and keep=8 gets each best crop
    about three times); the caller logs this.
    """
    crops = random_resized_crops(images[: settings.max_images], settings.n_crops, side, settings.scale, settings.ratio, g)
    n = len(crops)
    loss = teacher_losses(teacher, crops.flatten(0, 1), c, settings.batch, device).view(n, settings.n_crops)
    best_loss, best = loss.min(dim=1)
    best_patches = crops[torch.arange(n), best]
    order = torch.argsort(best_loss, stable=True)
    order = order.repeat((keep + n - 1) // n)[:keep]
    return best_patches[order], best_loss[order]


def make_collages(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Tile ``[K * grid**2, 3, s, s]`` row-major into ``[K, 3, grid*s, grid*s]`` (inverse of split_patches)."""
    k = len(patches) // (grid * grid)
    _, ch, s, _ = patches.shape
    x = patches[: k * grid * grid].reshape(k, grid, grid, ch, s, s)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(k, ch, grid * s, grid * s)
