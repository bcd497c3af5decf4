"""Patch selection (RDED-style) and collages.

For each real image, ``n_crops`` random resized crops go through the teacher;
the crop with the lowest cross-entropy on the image's class is that image's
patch ("most informative" in D3M's and RDED's sense: the teacher is surest of
the class). Per class the ``keep`` lowest-loss patches survive and are tiled
``grid x grid`` into collages, the images textual inversion learns from.

The images arrive as a stream (builder/prefetch.py: decoded by threads while
the teacher works), are moved to the device batch by batch, cropped and resized
there (builder/crops.py), and scored in teacher calls of exactly
``PatchSettings.batch`` crops in image order, the calls of every earlier build,
so a build's patches do not depend on how the stream is batched. Only the
losses are kept; the winning crops are cut again at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .crops import crop_boxes, resize_crops
from .prefetch import ImageStream


@dataclass(frozen=True)
class PatchSettings:
    """Patch selection: how many real images and random crops the teacher scores per class."""

    n_crops: int = 5  # random resized crops scored per real image (RDED: 5)
    scale: tuple[float, float] = (0.5, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    max_images: int = 300  # real images per class considered (RDED: 300)
    batch: int = 256  # crops per teacher call


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1 (the division every source used to do on the CPU); float stays float32."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def random_resized_crops(images: torch.Tensor, n_crops: int, out_side: int, scale, ratio, g: torch.Generator) -> torch.Tensor:
    """``n_crops`` crops per image (area ~U(scale), log-aspect ~U(log ratio)), resized: ``[N, n_crops, 3, s, s]``."""
    n, ch, h, w = images.shape
    boxes = crop_boxes(n, n_crops, h, w, scale, ratio, g).view(-1, 4)
    owner = torch.arange(n).repeat_interleave(n_crops)
    return resize_crops(images, owner, boxes, out_side).view(n, n_crops, ch, out_side, out_side)


@torch.no_grad()
def teacher_losses(teacher, patches: torch.Tensor, c: int, batch: int, device: str) -> torch.Tensor:
    """Cross-entropy of class ``c`` for each patch ``[M, 3, s, s]`` -> ``[M]``."""
    losses = []
    for chunk in patches.split(batch):
        logits = teacher(chunk.to(device)).float()
        target = torch.full((len(chunk),), c, dtype=torch.long, device=logits.device)
        losses.append(F.cross_entropy(logits, target, reduction="none").cpu())
    return torch.cat(losses)


def crop_losses(stream: ImageStream, c: int, teacher, side: int, settings: PatchSettings, g: torch.Generator,
                device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every crop of the stream: (boxes ``[n, k, 4]``, losses ``[n, k]``, the images ``[n, 3, H, W]`` as given)."""
    n, k = stream.count, settings.n_crops
    boxes, kept, pending, scored = None, [], [], []
    done = 0  # images cropped so far
    for batch in stream.batches:
        # 1. the batch on the device; the boxes of every image, drawn once the image size is known
        if boxes is None:
            boxes = crop_boxes(n, k, batch.shape[2], batch.shape[3], settings.scale, settings.ratio, g)
        kept.append(batch)
        owner = torch.arange(len(batch)).repeat_interleave(k)
        pending.append(resize_crops(as_float(batch.to(device)), owner, boxes[done : done + len(batch)].view(-1, 4), side))
        done += len(batch)
        # 2. teacher calls of exactly settings.batch crops, in image order (the last one may be smaller)
        queue = torch.cat(pending)
        full = len(queue) - len(queue) % settings.batch
        if full:
            scored.append(teacher_losses(teacher, queue[:full], c, settings.batch, device))
        pending = [queue[full:]]
    if done != n:
        raise RuntimeError(f"the image stream of class {c} held {done} images, announced {n}")
    rest = torch.cat(pending)
    if len(rest):
        scored.append(teacher_losses(teacher, rest, c, settings.batch, device))
    return boxes, torch.cat(scored).view(n, k), torch.cat(kept)


def select_patches(images, c: int, teacher, keep: int, side: int, settings: PatchSettings,
                   g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` most informative patches of class ``c``: (patches ``[keep, 3, side, side]``, their losses).

    ``images`` is a float ``[N, 3, H, W]`` tensor in [0, 1] or an :class:`ImageStream`
    (a source's ``image_stream``). If the class has fewer real images than
    ``keep``, the best crops are reused in order (a class with 3 images and
    keep=8 gets each best crop about three times); the caller logs this.
    """
    if isinstance(images, torch.Tensor):
        images = ImageStream.of(images[: settings.max_images])
    boxes, loss, real = crop_losses(images, c, teacher, side, settings, g, device)
    n = len(loss)
    best_loss, best = loss.min(dim=1)
    order = torch.argsort(best_loss, stable=True)
    order = order.repeat((keep + n - 1) // n)[:keep]
    # the winners, cut again exactly as they were scored
    winners = resize_crops(as_float(real[order].to(device)), torch.arange(len(order)), boxes[order, best[order]], side)
    return winners.cpu(), best_loss[order]


def make_collages(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Tile ``[K * grid**2, 3, s, s]`` row-major into ``[K, 3, grid*s, grid*s]`` (inverse of split_patches)."""
    k = len(patches) // (grid * grid)
    _, ch, s, _ = patches.shape
    x = patches[: k * grid * grid].reshape(k, grid, grid, ch, s, s)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(k, ch, grid * s, grid * s)
