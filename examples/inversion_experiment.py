"""Does inversion learn a category? Class names the built-in model does not know, with and without inversion.

Usage:
    python examples/inversion_experiment.py [--names word digits object multi] [--configs ti0 default]
                                            [--seeds 0 1 2] [--out out/inversion]

The built-in model was trained on MNIST with captions that name the digit
("digit seven"), so the class word is already the ideal prompt. A class name
the model does not know is the common real case (ImageNet's WordNet lines):
there the token has to be learned. Every row is an IPC 10 MNIST archive built
through the library with the class names replaced (the data, teacher and
seeds are those of the demo build):

  word     the class words zero ... nine (the reference)
  digits   the digit characters 0 ... 9: single tokens never seen in a caption
  object   "object" for every class (what a multi-token name started from before)
  multi    the German number words (null, eins, ... neun): several sub-word tokens
           each, initialised by the builder's rule (mean of the name's tokens)

and each with ``--configs``: ``ti0`` (``--ti-steps 0``: the initialiser itself),
``default`` (the built-in model's inversion defaults), or the variants in
CONFIGS. Plus ``random real + soft`` (10 random real digits per class).
Reported: the teacher's agreement with the class on the archive's regenerated
patches, the stored-protocol student (ConvNet-3, --steps of batch 64, KD at
T=4; examples/benchmark.py's recipe) on the 1,000 held-out test digits, mean ±
std over the seeds, and per build the render-score cost against the inversion.
Rows are cached in OUT/<row>.json; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch.utils.data import TensorDataset  # noqa: E402
from evaluation.baselines import random_subset_indices  # noqa: E402
from evaluation.heldout import builtin_mnist_heldout  # noqa: E402
from evaluation.protocols import TrainConfig, evaluate, train_student  # noqa: E402

import d3mfmt  # noqa: E402
from d3mfmt import ClassInfo, D3MDataset  # noqa: E402
from d3mfmt.mnist import MNIST_CLASS_NAMES, load_mnist, to_rgb32  # noqa: E402
from builder.assemble import write_archive  # noqa: E402
from builder.inversion import InversionSettings  # noqa: E402
from builder.labelling import teacher_probs  # noqa: E402
from builder.pipeline import build  # noqa: E402
from builder.settings import RunOptions, demo_settings  # noqa: E402
from builder.sources import MnistSource  # noqa: E402
from builder.teachers import resolve_teacher  # noqa: E402

NAMES = {
    "word": list(MNIST_CLASS_NAMES),
    "digits": [str(i) for i in range(10)],
    "object": ["object"] * 10,
    "multi": ["null", "eins", "zwei", "drei", "vier", "fuenf", "sechs", "sieben", "acht", "neun"],
}
CONFIGS = {  # name -> InversionSettings (None fields: the built-in model's defaults)
    "ti0": InversionSettings(steps=0),
    "default": InversionSettings(),
    "val-keep": InversionSettings(render_every=0),  # keep-best by validation loss only (the previous rule)
    "lr5e-4": InversionSettings(lr=5e-4),  # the previous learning rate
    "norm-init": InversionSettings(norm="init"),
    "norm-vocab": InversionSettings(norm="vocab"),
    "pull": InversionSettings(norm_pull=1.0),
}


@dataclass
class RenamedMnist(MnistSource):
    """The built-in MNIST train split with other class names (the ids and images are unchanged)."""

    names: tuple = ()

    @property
    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(str(i), name) for i, name in enumerate(self.names)]


def build_row(names: str, config: str, out: Path) -> dict:
    """Build one archive; returns its path and what its build info and checkpoints say."""
    t0 = time.perf_counter()
    src = RenamedMnist("train", tuple(NAMES[names]))
    wd = build(src, demo_settings(ipc=10, inversion=CONFIGS[config]), out / f"{names}-{config}.work",
               run=RunOptions(device="cpu", progress=False))
    path = out / f"{names}-{config}.d3m"
    write_archive([wd.path], path, d3mfmt.LabelEncoding(), f"{names}-{config}")
    metas = [wd.load_class(c)[1] for c in range(10)]
    inv = [m["inversion"] for m in metas]
    invert_s = sum(m["seconds"]["invert"] for m in metas)
    render_s = sum(i.get("render_seconds", 0.0) for i in inv)
    return {"path": str(path), "bytes": path.stat().st_size, "build_s": time.perf_counter() - t0,
            "agreement": float(np.mean([m["regenerated"] for m in metas])),
            "per_class": [round(m["regenerated"], 3) for m in metas],
            "render_init": float(np.mean([i.get("render_init", np.nan) for i in inv])),
            "render_best": float(np.mean([i.get("render_best", np.nan) for i in inv])),
            "norm_init": float(np.mean([i["norm_init"] for i in inv])),
            "norm_best": float(np.mean([i["norm_best"] for i in inv])), "vocab_norm": inv[0]["vocab_norm"],
            "best_steps": [i["best_step"] for i in inv], "invert_s": invert_s, "render_s": render_s}


def student_accuracy(data, seeds: list[int], steps: int, heldout) -> list[float]:
    return [evaluate(train_student(data, "stored", "convnet3", TrainConfig(steps=steps, seed=s)), heldout.images,
                     heldout.labels) for s in seeds]


def table(rows: list[dict]) -> str:
    lines = ["| class names | inversion | teacher agreement, regenerated | student % (3 seeds) | "
             "render score init -> kept | norm init -> kept (vocab mean) | render-score s / inversion s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = f"{100 * np.mean(r['accs']):.2f} ± {100 * np.std(r['accs']):.2f}"
        if "agreement" not in r:
            lines.append(f"| {r['names']} | | | {acc} | | | |")
            continue
        render = "" if np.isnan(r["render_best"]) else f"{r['render_init']:.3f} -> {r['render_best']:.3f}"
        cost = "" if not r["render_s"] else f"{r['render_s']:.0f} / {r['invert_s'] - r['render_s']:.0f}"
        lines.append(f"| {r['names']} | {r['config']} | {r['agreement']:.3f} | {acc} | {render} | "
                     f"{r['norm_init']:.3f} -> {r['norm_best']:.3f} ({r['vocab_norm']:.3f}) | {cost} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", nargs="+", default=list(NAMES), choices=list(NAMES))
    ap.add_argument("--configs", nargs="+", default=["ti0", "default"], choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="student steps (benchmark.py's budget)")
    ap.add_argument("--no-real", action="store_true", help="leave out the random real + soft row")
    ap.add_argument("--out", type=Path, default=Path("out/inversion"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    heldout, rows = builtin_mnist_heldout(), []
    if not args.no_real:
        teacher, _ = resolve_teacher("mnist-cnn")
        x, y = load_mnist("train")
        idx = random_subset_indices(y, 10, 0)
        images, labels = to_rgb32(x[idx]), torch.from_numpy(y[idx])
        real = TensorDataset(images, teacher_probs(teacher, images, 1.0, "cpu").float(), labels)
        rows.append({"names": "random real + soft", "accs": student_accuracy(real, args.seeds, args.steps, heldout)})
    for names in args.names:
        for config in args.configs:
            cache = args.out / f"{names}-{config}.json"
            if cache.exists():
                rows.append(json.loads(cache.read_text()))
                continue
            row = {"names": names, "config": config, **build_row(names, config, args.out)}
            data = D3MDataset(row["path"], cache_dir=args.out / "cache")
            row["accs"] = student_accuracy(data, args.seeds, args.steps, heldout)
            cache.write_text(json.dumps(row, indent=1))
            logging.info("%s %s: agreement %.3f, student %.2f", names, config, row["agreement"],
                         100 * np.mean(row["accs"]))
            rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
