"""Does the archive work? Student accuracy against bytes stored, on the built-in MNIST data.

Usage:
    python examples/benchmark.py [--ipc 1 10] [--seeds 0 1 2] [--steps 500] [--out bench_out]

For every IPC, the same ConvNet-3 student and the same budget (--steps of
batch 64, AdamW, cosine) everywhere, accuracy on the 1,000 held-out digits:

  full train split        4,000 real digits, hard labels (upper bound)
  random real, hard       IPC random real digits per class, hard labels
  random real + soft      the same digits, teacher soft labels (dense fp16)
  real-patch collages     RDED-style: the teacher's best crops tiled 2x2, per-patch soft labels
  .d3m one-hot            the archive, labels stored as class indices
  .d3m soft (default)     the archive, top-5 u8sqrt labels
  .d3m dense fp32         the archive, full fp32 labels (prices the label encoding)
  .d3m, no inversion      IPC 10 only: the class word's own embedding, no textual inversion (ablation)

All three archives come from one d3m-build work directory per IPC (the labels
are encoded at write time), built with the demo defaults. Bytes: PNG files
plus label bytes for real-image rows, file size for archives. Writes
OUT/benchmark.md, OUT/benchmark.json and OUT/benchmark.png (accuracy vs bytes).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_student import TrainConfig, batches, mnist_eval_set, train_on  # noqa: E402

import d3mfmt  # noqa: E402
from builder.assemble import write_archive  # noqa: E402
from builder.inversion import InversionSettings  # noqa: E402
from builder.pipeline import build  # noqa: E402
from builder.settings import RunOptions, demo_settings  # noqa: E402
from builder.labelling import teacher_probs  # noqa: E402
from builder.patches import PatchSettings, make_collages, select_patches  # noqa: E402
from builder.sources import MnistSource  # noqa: E402
from builder.teachers import load_teacher  # noqa: E402
from d3mfmt import D3MDataset  # noqa: E402
from d3mfmt.mnist import load_mnist, to_rgb32  # noqa: E402


def png_bytes(images: torch.Tensor) -> int:
    """Total size of the images as 8-bit grayscale PNG files (digits are gray)."""
    total = 0
    for x in images:
        buf = io.BytesIO()
        Image.fromarray((x.mean(0) * 255).round().byte().numpy(), "L").save(buf, format="PNG", optimize=True)
        total += buf.tell()
    return total


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_mnist("train")
    return to_rgb32(x), torch.from_numpy(y)


def random_subset(labels: torch.Tensor, ipc: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.cat([torch.nonzero(labels == c)[:, 0][torch.randperm(int((labels == c).sum()), generator=g)[:ipc]]
                      for c in range(10)])


def rded_patches(ipc: int, teacher, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """RDED-style: best crops per image, lowest-loss 4*IPC per class, tiled 2x2; (patches, soft labels, bytes)."""
    source, patches = MnistSource("train"), []
    for c in range(10):
        p, _ = select_patches(source.images(c, side=64), c, teacher, 4 * ipc, 32, PatchSettings(),
                              torch.Generator().manual_seed(seed * 100 + c), "cpu")
        patches.append(p)
    patches = torch.cat(patches)
    probs = teacher_probs(teacher, patches, 1.0, "cpu").float()
    collages = make_collages(patches, 2)
    label_bytes = len(d3mfmt.labels.compress(d3mfmt.encode_labels(probs.numpy(), d3mfmt.LabelEncoding())))
    return patches, probs, png_bytes(collages) + label_bytes


def build_archives(ipc: int, out: Path) -> dict[str, Path]:
    """One demo build per IPC, written with three label encodings; plus, for IPC 10, one without inversion."""
    paths = {}
    if ipc == 10:  # ablation: what textual inversion adds over the class word's own embedding
        wd0 = build(MnistSource("train"), demo_settings(ipc=ipc, inversion=InversionSettings(steps=0)),
                    out / f"ipc{ipc}-noinv.work", run=RunOptions(device="cpu"))
        path = out / f"mnist_ipc{ipc}_no_inversion.d3m"
        write_archive([wd0.path], path, d3mfmt.LabelEncoding(), path.stem)
        paths[".d3m soft, no inversion (class word)"] = path
    wd = build(MnistSource("train"), demo_settings(ipc=ipc), out / f"ipc{ipc}.work", run=RunOptions(device="cpu"))
    encodings = {
        ".d3m one-hot": d3mfmt.LabelEncoding("hard", 1, None),
        ".d3m soft (default)": d3mfmt.LabelEncoding(),
        ".d3m dense fp32": d3mfmt.LabelEncoding("dense", None, "f32"),
    }
    for name, enc in encodings.items():
        path = out / f"mnist_ipc{ipc}_{enc.kind}{'' if enc.values is None else '_' + enc.values}.d3m"
        write_archive([wd.path], path, enc, path.stem)
        paths[name] = path
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    teacher = load_teacher("mnist-cnn")
    eval_set = mnist_eval_set()
    images, labels = real_digits()
    onehot = F.one_hot(labels, 10).float()
    results = []

    def run(name: str, ipc, x, p, nbytes: int, loss: str) -> None:
        """x, p: tensors, or x a D3MDataset (read through a DataLoader, as a user would) and p None."""
        data = x if p is None else TensorDataset(x, p)
        accs = []
        for s in args.seeds:
            cfg = TrainConfig(steps=args.steps, loss=loss, seed=s)
            accs.append(train_on(batches(data, cfg), eval_set, cfg, progress=False))
        results.append({"ipc": ipc, "method": name, "bytes": nbytes, "mean": float(np.mean(accs)),
                        "std": float(np.std(accs)), "accs": accs, "loss": loss})
        print(f"ipc {ipc} {name}: {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f} ({nbytes:,} bytes)",
              f"[{time.perf_counter() - start:.0f}s]", file=sys.stderr, flush=True)

    run("full train split", "all", images, onehot, png_bytes(images) + len(labels), "ce")
    for ipc in args.ipc:
        # real-image baselines (one subset per student seed would mix two sources of variance: use seed 0's)
        idx = random_subset(labels, ipc, 0)
        x = images[idx]
        run("random real, hard", ipc, x, onehot[idx], png_bytes(x) + len(idx), "ce")
        soft = teacher_probs(teacher, x, 1.0, "cpu").float()
        run("random real + soft", ipc, x, soft, png_bytes(x) + 2 * 10 * len(idx), "kd")
        px, pp, nbytes = rded_patches(ipc, teacher, 0)
        run("real-patch collages + soft", ipc, px, pp, nbytes, "kd")
        for name, path in build_archives(ipc, args.out).items():
            dataset = D3MDataset(path, cache_dir=args.out / "cache")
            run(name, ipc, dataset, None, path.stat().st_size, "ce" if "one-hot" in name else "kd")

    (args.out / "benchmark.json").write_text(json.dumps(results, indent=1))
    lines = [f"| IPC | method | bytes | accuracy % (mean ± std, {len(args.seeds)} seeds) |", "|---|---|---:|---:|"]
    lines += [f"| {r['ipc']} | {r['method']} | {r['bytes']:,} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} |" for r in results]
    (args.out / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, args.out / "benchmark.png")
    print(f"total {time.perf_counter() - start:.0f}s", file=sys.stderr)


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"1": "o", "10": "s", "all": "*"}
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method]
        ax.errorbar([r["bytes"] for r in rows], [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows],
                    fmt="-", marker=None, label=method, capsize=3)
        for r in rows:
            ax.scatter(r["bytes"], 100 * r["mean"], marker=markers[str(r["ipc"])], s=40)
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored (log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("MNIST: student accuracy vs storage (circle IPC 1, square IPC 10, star full)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
