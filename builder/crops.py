"""Random resized crops: the boxes, and their antialiased resize in batches on the device.

Boxes (:func:`crop_boxes`) are four draws from the class's CPU generator: area
~ U(scale) of the image, log-aspect ~ U(log ratio), then the top-left corner;
the same draws in the same order as every build before this module.

The resize is PyTorch's antialiased bilinear (``F.interpolate(..., mode="bilinear",
antialias=True)``: PIL's triangle filter, widened by the downscale factor),
applied separably, width first, then height:

- on the CPU, :func:`resize_crops` calls that kernel once per crop: it is the
  fastest CPU code for it (a batched gather was 8x slower here) and keeps the
  patches bit-identical to earlier builds;
- on any other device, :func:`resize_crops_batched` applies the same weights
  as a few gathers over a whole batch of crops, without a Python loop per
  crop. The weights come from the CPU kernel itself (resizing an identity
  matrix gives them exactly), so the two paths differ only in rounding: within
  a few float32 ulps (tested), because PyTorch's kernel sometimes fuses its
  multiply-adds and elementwise ops never do. No matmul is involved, so TF32
  settings cannot change the result.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

RESIZE_BATCH = 64  # crops per batched resize on the device (~0.2 GB of float32 work at 512 px)


def crop_boxes(n: int, n_crops: int, h: int, w: int, scale, ratio, g: torch.Generator) -> torch.Tensor:
    """``[n, n_crops, 4]`` int64 boxes (y0, x0, height, width) inside an ``h x w`` image."""
    area = torch.empty(n, n_crops).uniform_(*scale, generator=g) * h * w
    log_r = torch.empty(n, n_crops).uniform_(*torch.log(torch.tensor(ratio)).tolist(), generator=g)
    aspect = torch.exp(log_r)
    ch = torch.sqrt(area / aspect).round().clamp(1, h).long()
    cw = torch.sqrt(area * aspect).round().clamp(1, w).long()
    y0 = (torch.rand(n, n_crops, generator=g) * (h - ch + 1)).floor().long()
    x0 = (torch.rand(n, n_crops, generator=g) * (w - cw + 1)).floor().long()
    return torch.stack([y0, x0, ch, cw], dim=-1)


def resize_crops(images: torch.Tensor, owner: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """Crop ``boxes[i]`` out of ``images[owner[i]]`` and resize it to ``side``: ``[len(boxes), C, side, side]``.

    Args:
        images: float ``[N, C, H, W]`` on the device that does the work.
        owner: ``[M]`` image index of each box; ``boxes``: ``[M, 4]`` (y0, x0, height, width).
    """
    if images.device.type != "cpu":
        return torch.cat([resize_crops_batched(images, owner[i : i + RESIZE_BATCH], boxes[i : i + RESIZE_BATCH], side)
                          for i in range(0, len(boxes), RESIZE_BATCH)])
    out = torch.empty(len(boxes), images.shape[1], side, side, dtype=images.dtype)
    for i, (n, (y0, x0, ch, cw)) in enumerate(zip(owner.tolist(), boxes.tolist())):
        crop = images[n : n + 1, :, y0 : y0 + ch, x0 : x0 + cw]
        out[i] = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]
    return out


@functools.lru_cache(maxsize=64)
def _taps_table(max_size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every input length L in 0..max_size: first input index ``[L, side]`` and weights ``[L, side, K]``.

    Row L holds the antialiased-bilinear taps of a resize L -> ``side`` as PyTorch's
    CPU kernel computes them: ``F.interpolate`` of the identity matrix returns
    exactly those weights, since every output is one weight times 1 plus zeros.
    """
    dense = [torch.zeros(side, 1)] + [
        F.interpolate(torch.eye(n).view(n, 1, 1, n), size=(1, side), mode="bilinear", align_corners=False,
                      antialias=True)[:, 0, 0, :].T
        for n in range(1, max_size + 1)]
    spans = []
    for w in dense:
        nonzero = w != 0
        first = nonzero.float().argmax(1)
        last = w.shape[1] - 1 - nonzero.flip(1).float().argmax(1)
        spans.append((first, (last - first + 1) * nonzero.any(1)))
    k = max(int(size.max()) for _, size in spans)
    firsts = torch.zeros(max_size + 1, side, dtype=torch.long)
    weights = torch.zeros(max_size + 1, side, k)
    for n, (w, (first, size)) in enumerate(zip(dense, spans)):
        taps = torch.arange(k)
        index = (first[:, None] + taps).clamp(max=w.shape[1] - 1)
        firsts[n] = first
        weights[n] = torch.gather(w, 1, index) * (taps < size[:, None])
    return firsts, weights


def resize_crops_batched(images: torch.Tensor, owner: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """:func:`resize_crops` for one batch of boxes, as gathers on ``images``' device (any device, CPU included)."""
    # 1. each crop's taps: first input index and weights per output pixel, per axis
    device = images.device
    _, c, h, w = images.shape
    firsts, weights = _taps_table(max(h, w), side)
    y0, x0, ch, cw = (boxes[:, i].cpu() for i in range(4))
    fx, wx = firsts[cw].to(device), weights[cw].to(device)  # [B, side], [B, side, K]
    fy, wy = firsts[ch].to(device), weights[ch].to(device)
    b, rows = len(boxes), int(ch.max())
    # 2. the crops' rows, full width: [B, C, rows, W] (rows past a crop's height are never weighted)
    row_index = (y0[:, None] + torch.arange(rows)).clamp(max=h - 1).to(device)
    strip = images[owner.to(device)[:, None], :, row_index].permute(0, 2, 1, 3)
    # 3. horizontal pass, then vertical: one gather and one multiply-add per tap, in tap order
    x_start = (x0.to(device)[:, None] + fx)[:, None, None, :]
    wide = None
    for k in range(wx.shape[2]):
        index = (x_start + k).clamp(max=w - 1).expand(b, c, rows, side)
        term = torch.gather(strip, 3, index) * wx[:, None, None, :, k]
        wide = term if wide is None else wide + term
    out = None
    for k in range(wy.shape[2]):
        index = (fy + k).clamp(max=rows - 1)[:, None, :, None].expand(b, c, side, side)
        term = torch.gather(wide, 2, index) * wy[:, None, :, None, k]
        out = term if out is None else out + term
    return out
