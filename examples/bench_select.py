"""Patch selection of one class, before and after the streamed, device-batched path.

Usage:
    python examples/bench_select.py                      # 300 JPEGs, 512 px, 5 crops each, on the CPU
    python examples/bench_select.py --device cuda        # the same on a GPU (adds the batched rows there)
    python examples/bench_select.py --images 60 --repeats 1   # a quick look

One class as a Stable Diffusion 1.x build sees it (512-px collages, 2x2 grid):
``--images`` real JPEGs of 500x375 px (ImageNet's typical size, synthetic
content) are decoded and resized (shorter side to 512, bicubic, centre crop),
5 random resized crops each are resized to 256 px (antialiased bilinear) and
scored by a small CNN teacher (a stride-8 stem, two convolutions, 10 classes,
fixed random weights: cheap, so the table shows the pipeline, not the
teacher). Rows:

- ``before``: what builds did until now: decode every image on the main thread
  (``ImageFolderSource.images``), then one ``F.interpolate`` per crop and the
  teacher on ``PatchSettings.batch``-crop calls (``tests/test_patches.py``'s
  reference: the old code);
- ``after``: ``ImageFolderSource.image_stream`` (decoding on
  ``DECODE_THREADS`` threads while the main thread crops and scores) into
  ``select_patches``; on the CPU the crops stay one kernel call each (the
  fastest CPU code, bit-identical patches), on a GPU they are batched gathers;
Each row is the median of ``--repeats`` runs in seconds per class, with the
speed-up over ``before`` and whether its patches equal ``before``'s. A second
table times the crops alone: the per-crop kernel on the CPU against the
batched gathers on ``--device`` (on the CPU only to show why the CPU keeps
the per-crop kernel); a third the decoding alone, on the main thread and on
the prefetching threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from builder import crops as crops_module  # noqa: E402
from builder.patches import PatchSettings, select_patches  # noqa: E402
from builder.prefetch import DECODE_THREADS  # noqa: E402
from builder.sources import ImageFolderSource  # noqa: E402
from test_patches import reference_selection  # noqa: E402

PATCH, KEEP = 256, 40  # SD 1.x: 512-px 2x2 collages; IPC 10 x 4 patches kept


def small_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval().requires_grad_(False)


def write_jpegs(root: Path, n: int) -> Path:
    """``n`` 500x375 JPEGs of smooth random content in ``root/cls``."""
    rng = np.random.default_rng(0)
    (root / "cls").mkdir(parents=True)
    for i in range(n):
        low = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
        img = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-20, 21, (375, 500, 3))
        Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8)).save(
            root / "cls" / f"{i:05d}.jpg", quality=90)
    return root


def run_before(source, teacher, s, device):
    images = source.images(0, side=2 * PATCH, limit=s.max_images)
    return reference_selection(images, 3, teacher.to(device), KEEP, PATCH, s, torch.Generator().manual_seed(0))


def run_after(source, teacher, s, device):
    stream = source.image_stream(0, side=2 * PATCH, limit=s.max_images)
    return select_patches(stream, 3, teacher.to(device), KEEP, PATCH, s, torch.Generator().manual_seed(0), device)


def decode_rows(source, n: int) -> list[tuple[str, float]]:
    """Decoding alone, images per second: the main thread (``images``) vs the prefetching threads (``image_stream``)."""
    rows = []
    for name, fn in (("main thread", lambda: source.images(0, side=2 * PATCH, limit=n)),
                     (f"{DECODE_THREADS} threads", lambda: list(source.image_stream(0, side=2 * PATCH, limit=n).batches))):
        start = time.perf_counter()
        fn()
        rows.append((name, n / (time.perf_counter() - start)))
    return rows


def crop_rows(device: str, n: int) -> list[tuple[str, float]]:
    """Crops alone: ``n`` images' 5 crops each, 512 -> 256 px, per-crop kernel on the CPU vs batched on ``device``."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 2 * PATCH, 2 * PATCH, generator=g)
    boxes = crops_module.crop_boxes(n, 5, 2 * PATCH, 2 * PATCH, (0.5, 1.0), (3 / 4, 4 / 3), g).view(-1, 4)
    owner = torch.arange(n).repeat_interleave(5)
    rows = []
    for name, where, fn in (("per-crop kernel", "cpu", crops_module.resize_crops),
                            ("batched gathers", device, crops_module.resize_crops_batched)):
        x = images.to(where)
        fn(x[:2], owner[:10], boxes[:10], PATCH)  # warm-up (and the tap table)
        start = time.perf_counter()
        for i in range(0, len(boxes), 64):
            fn(x, owner[i : i + 64], boxes[i : i + 64], PATCH)
        if where.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append((f"{name} ({where})", 1000 * (time.perf_counter() - start) / len(boxes)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    s, teacher = PatchSettings(max_images=args.images), small_teacher()
    with tempfile.TemporaryDirectory() as tmp:
        source = ImageFolderSource(write_jpegs(Path(tmp), args.images))
        rows, reference = [], None
        for name, fn in (("before", run_before), ("after", run_after)):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                patches, _ = fn(source, teacher, s, args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            reference = patches if reference is None else reference
            same = "yes" if torch.equal(patches.cpu(), reference.cpu()) else \
                f"no (max diff {float((patches.cpu() - reference.cpu()).abs().max()):.1e})"
            rows.append((name, statistics.median(times), same))
        decoding = decode_rows(source, args.images)
    print(f"| path ({args.device}, {args.images} JPEGs 500x375 -> 512 px, 5 crops -> {PATCH} px, "
          f"{torch.get_num_threads()} torch threads, {DECODE_THREADS} decode threads) | s/class | x before | "
          "same patches as before |")
    print("|---|---|---|---|")
    for name, seconds, same in rows:
        print(f"| {name} | {seconds:.2f} | {rows[0][1] / seconds:.2f} | {same} |")
    print()
    print("| decoding alone (500x375 JPEG -> 512 px) | images/s |")
    print("|---|---|")
    for name, rate in decoding:
        print(f"| {name} | {rate:.1f} |")
    print()
    print("| crops alone (512 -> 256 px) | ms/crop |")
    print("|---|---|")
    for name, ms in crop_rows(args.device, min(args.images, 60)):
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
