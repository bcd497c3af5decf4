"""Measure soft-label encodings: stored bytes per patch against fidelity.

Usage:
    python examples/measure_label_encodings.py [--crops 4000] [--seed 0]

Two label sources:

1. ``mnist-cnn``: the built-in teacher's softmax on random resized crops of
   the MNIST train split (scale 0.3-1, resized to 32 px), at temperature 1 and 4.
2. ``synthetic-1k``: 40,000 rows over 1,000 classes (ImageNet-1k, IPC 10,
   2x2 grid) from the peaked generator in examples/size_report.py.

For every encoding the script writes the label member exactly as an archive
would (zstd level 19) and reports compressed bytes per patch, the mean
KL(p || decoded) in nats, the max over rows, and top-1 agreement with the
fp32 distribution. Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from builder.teachers import load_teacher
from d3mfmt.labels import LabelEncoding, compress, decompress, encode
from d3mfmt.mnist import load_mnist
from size_report import synthetic_imagenet_probs  # examples/ is on sys.path when run as a script

ENCODINGS = [
    LabelEncoding("dense", None, "f32"),
    LabelEncoding("dense", None, "f16"),
    LabelEncoding("hard", 1, None),
    *[LabelEncoding("topk", k, v) for k in (1, 2, 3, 5, 10) for v in ("f16", "u8", "u8sqrt")],
]


def random_crops(images: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n random resized crops (scale 0.3-1, aspect 3/4-4/3) of 32-px padded digits."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255.0
    out = torch.empty(n, 1, 32, 32)
    for t in range(n):
        img = torch.from_numpy(padded[rng.integers(len(padded))])
        area = rng.uniform(0.3, 1.0) * 32 * 32
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        h = int(min(32, max(4, round(np.sqrt(area / aspect)))))
        w = int(min(32, max(4, round(np.sqrt(area * aspect)))))
        y, x = rng.integers(0, 33 - h), rng.integers(0, 33 - w)
        crop = img[y : y + h, x : x + w][None, None]
        out[t] = torch.nn.functional.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False)[0]
    return out


def teacher_probs(crops: torch.Tensor, temperature: float) -> np.ndarray:
    teacher = load_teacher("mnist-cnn")
    with torch.no_grad():
        logits = torch.cat([teacher(b) for b in crops.split(512)])
    return torch.softmax(logits.double() / temperature, dim=1).numpy()


def fidelity(p: np.ndarray, enc: LabelEncoding) -> tuple[float, float, float, float]:
    """(bytes/patch, mean KL, max KL, top-1 agreement) of encoding ``enc`` on rows ``p``."""
    frame = compress(encode(p.astype(np.float32), enc))
    q = decompress(frame, enc, len(p), p.shape[1]).dense().astype(np.float64)
    kl = np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), axis=1)
    agree = np.mean(p.argmax(1) == q.argmax(1))
    return len(frame) / len(p), float(kl.mean()), float(kl.max()), float(agree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crops", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    images, _ = load_mnist("train")
    crops = random_crops(images, args.crops, rng)
    sources = {f"mnist-cnn T={t:g}": teacher_probs(crops, t) for t in (1.0, 4.0)}
    sources["synthetic-1k"] = synthetic_imagenet_probs(rng)
    print(f"label sources: {', '.join(f'{k} ({len(v)} rows x {v.shape[1]})' for k, v in sources.items())}", file=sys.stderr)

    print("| source | encoding | bytes/patch | mean KL (nats) | max KL | top-1 agreement |")
    print("|---|---|---:|---:|---:|---:|")
    for name, p in sources.items():
        for enc in ENCODINGS:
            if enc.kind == "topk" and enc.k >= p.shape[1]:
                continue
            b, kl, klmax, agree = fidelity(p, enc)
            label = enc.kind + ("" if enc.kind != "topk" else f" k={enc.k}") + (f" {enc.values}" if enc.values else "")
            print(f"| {name} | {label} | {b:.2f} | {kl:.2e} | {klmax:.2e} | {agree:.4f} |", flush=True)


if __name__ == "__main__":
    main()
