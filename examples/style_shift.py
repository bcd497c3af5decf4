"""Where textual inversion should matter: a digit style the class word does not name.

Usage:
    python examples/style_shift.py [--source bold|mnist] [--seeds 0 1 2] [--out out/style]
                                   [--lr 5e-4] [--ti-steps 100] [--ti-batch 16] [--vectors 1] [--timesteps uniform]

The built-in model was trained on MNIST with "digit seven" in its captions, so
on MNIST the class word is already the ideal prompt. D3M's claim is that the
learned token captures a data set's own look. ``--source bold`` tests that
within the model's range: every MNIST digit's strokes dilated by a 3x3 maximum
(bold digits occur in MNIST, but "digit seven" does not render them by
default), with its own held-out split (the bold MNIST test split) and its own
teacher (the built-in ``mnist-cnn`` fine-tuned on the bold train split at run
time, fixed seed, ~1 min on a CPU). The bold digits are written as an
ImageFolder of PNG files and built through ``d3m-build``'s library like any
user's data.

Rows, all at IPC 10 with the same student protocol as examples/benchmark.py
(ConvNet-3, --steps of batch 64, KD at T=4, held-out accuracy, mean of seeds):

  random real + soft      10 random real digits per class, teacher soft labels
  .d3m, class word        d3m-build with --ti-steps 0: the class word's embedding
  .d3m, inverted token    d3m-build with the given inversion settings

Writes OUT/<source>.md and OUT/<source>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch.utils.data import TensorDataset  # noqa: E402
from evaluation.heldout import builtin_mnist_heldout  # noqa: E402
from evaluation.metrics import png_bytes  # noqa: E402
from evaluation.protocols import TrainConfig, evaluate, train_student  # noqa: E402

import d3mfmt  # noqa: E402
from d3mfmt import D3MDataset  # noqa: E402
from builder.assemble import write_archive  # noqa: E402
from builder.inversion import InversionSettings  # noqa: E402
from builder.pipeline import build  # noqa: E402
from builder.settings import DEMO_MODEL, BuildSettings, RunOptions, model_defaults  # noqa: E402
from builder.labelling import teacher_probs  # noqa: E402
from builder.sources import ImageFolderSource, MnistSource  # noqa: E402
from builder.teachers import load_teacher  # noqa: E402
from d3mfmt.mnist import MNIST_CLASS_NAMES, load_mnist  # noqa: E402

TEACHER_ENV = "D3M_BOLD_TEACHER"  # where bold_teacher() finds the fine-tuned weights


def bold_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST split with strokes dilated by a 3x3 maximum, padded to 32 px, RGB in [0, 1]."""
    x, y = load_mnist(split)
    x = torch.from_numpy(x).float().div(255)[:, None]
    x = F.max_pool2d(x, 3, stride=1, padding=1)
    x = F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1)
    return x.contiguous(), torch.from_numpy(y).long()


def write_imagefolder(root: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One sub-folder per digit ("0".."9"), 8-bit grayscale PNGs (lossless for these pixels)."""
    if (root / "done").is_file():
        return
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (x, c) in enumerate(zip(images, labels.tolist())):
        Image.fromarray((x[0] * 255).round().byte().numpy(), "L").save(root / str(c) / f"{i:05d}.png")
    (root / "done").write_text("")


def bold_source(root: Path) -> ImageFolderSource:
    return ImageFolderSource(root, [str(c) for c in range(10)], list(MNIST_CLASS_NAMES))


def finetune_teacher(images: torch.Tensor, labels: torch.Tensor, out: Path, epochs: int = 3, seed: int = 0) -> None:
    """The built-in mnist-cnn fine-tuned on ``images`` (AdamW, cosine, fixed seed); fp32 safetensors."""
    from safetensors.torch import save_file

    if out.is_file():
        return
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = load_teacher("mnist-cnn").train().requires_grad_(True)
    steps = epochs * (len(images) // 128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for idx in order[: len(order) // 128 * 128].split(128):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))


def bold_teacher() -> torch.nn.Module:
    """``--teacher style_shift:bold_teacher``: mnist-cnn with the fine-tuned weights named by $D3M_BOLD_TEACHER."""
    from safetensors.torch import load_file

    from builder.teachers import MnistCNN

    model = MnistCNN()
    model.load_state_dict(load_file(os.environ[TEACHER_ENV]))
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.eval()(images).argmax(1) == labels).float().mean())


def prepare(source: str, out: Path):
    """(build source, teacher name, teacher module, train images, train labels, eval set) for ``source``."""
    if source == "mnist":
        from d3mfmt.mnist import to_rgb32

        x, y = load_mnist("train")
        heldout = builtin_mnist_heldout()
        return (MnistSource("train"), "mnist-cnn", load_teacher("mnist-cnn"), to_rgb32(x), torch.from_numpy(y),
                (heldout.images, heldout.labels))
    x, y = bold_digits("train")
    xt, yt = bold_digits("test")
    write_imagefolder(out / "bold-train", x, y)
    weights = out / "bold-teacher.safetensors"
    t0 = time.perf_counter()
    finetune_teacher(x, y, weights)
    os.environ[TEACHER_ENV] = str(weights)
    teacher = bold_teacher()
    logging.info("bold teacher: held-out bold accuracy %.4f (mnist-cnn before fine-tuning: %.4f) [%.0fs]",
                 accuracy(teacher, xt, yt), accuracy(load_teacher("mnist-cnn"), xt, yt), time.perf_counter() - t0)
    return bold_source(out / "bold-train"), "style_shift:bold_teacher", teacher, x, y, (xt, yt)


def build_archive(src, teacher_name: str, inversion: InversionSettings, out: Path, name: str) -> Path:
    t0 = time.perf_counter()
    wd = build(src, BuildSettings(model=DEMO_MODEL, teacher=teacher_name, ipc=10, inversion=inversion),
               out / f"{name}.work", run=RunOptions(device="cpu", progress=False))
    path = out / f"{name}.d3m"
    write_archive([wd.path], path, d3mfmt.LabelEncoding(), name)
    logging.info("%s: built in %.0fs", name, time.perf_counter() - t0)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=["bold", "mnist"], default="bold")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="student steps (benchmark.py's budget)")
    ap.add_argument("--out", type=Path, default=Path("out/style"))
    d, inv = model_defaults(DEMO_MODEL), InversionSettings()
    ap.add_argument("--lr", type=float, default=d.ti_lr)
    ap.add_argument("--ti-steps", type=int, default=d.ti_steps)
    ap.add_argument("--ti-batch", type=int, default=d.ti_batch)
    ap.add_argument("--vectors", type=int, default=inv.n_vectors)
    ap.add_argument("--timesteps", default=inv.timesteps)
    ap.add_argument("--skip", nargs="*", default=[], help="rows to leave out: real, word, inverted")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    src, teacher_name, teacher, x, y, eval_set = prepare(args.source, args.out)
    inversion = InversionSettings(steps=args.ti_steps, lr=args.lr, batch=args.ti_batch, n_vectors=args.vectors,
                                  timesteps=args.timesteps)
    tag = f"lr{args.lr:g}-s{args.ti_steps}-b{args.ti_batch}-v{args.vectors}-{args.timesteps}"
    results = []

    def run(name: str, data, nbytes: int, extra: dict | None = None) -> None:
        """``data``: (image, soft label, class) items, a TensorDataset or a D3MDataset, read through a DataLoader."""
        accs = []
        for s in args.seeds:
            model = train_student(data, "stored", "convnet3", TrainConfig(steps=args.steps, seed=s))
            accs.append(evaluate(model, *eval_set))
        results.append({"source": args.source, "method": name, "bytes": nbytes, "mean": float(np.mean(accs)),
                        "std": float(np.std(accs)), "accs": accs, **(extra or {})})
        logging.info("%s %s: %.2f +- %.2f", args.source, name, 100 * np.mean(accs), 100 * np.std(accs))

    if "real" not in args.skip:
        from evaluation.baselines import random_subset_indices

        idx = torch.from_numpy(random_subset_indices(y.numpy(), 10, 0))
        gray = (x[idx].mean(dim=1) * 255).round().to(torch.uint8).numpy()
        run("random real + soft", TensorDataset(x[idx], teacher_probs(teacher, x[idx], 1.0, "cpu").float(), y[idx]),
            png_bytes(gray) + 2 * 10 * len(idx))
    variants = ([] if "word" in args.skip else [("class word", InversionSettings(steps=0), f"{args.source}-word")]) + \
        ([] if "inverted" in args.skip else [(f"inverted ({tag})", inversion, f"{args.source}-{tag}")])
    for label, inv, name in variants:
        path = build_archive(src, teacher_name, inv, args.out, name)
        build_info = d3mfmt.load_file(path).manifest.build
        run(f".d3m, {label}", D3MDataset(path, cache_dir=args.out / "cache"), path.stat().st_size,
            {"inversion": build_info["inversion"], "agreement": build_info["regenerated_patch_agreement"]})

    stem = f"{args.source}-{tag}" + "".join(f"-no-{row}" for row in sorted(args.skip))
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    lines = [f"| source | method | bytes | accuracy % (mean ± std, {len(args.seeds)} seeds) | teacher agreement |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['source']} | {r['method']} | {r['bytes']:,} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | "
              f"{'' if 'agreement' not in r else format(r['agreement'], '.3f')} |" for r in results]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
