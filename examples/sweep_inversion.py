"""Sweep textual-inversion settings on a few classes of the built-in model, scored on held-out triples.

Usage:
    python examples/sweep_inversion.py [--sources bold mnist] [--classes 4 5] [--out out/sweep]

For every source and probe class, the class's collages are made exactly as
``d3m-build`` makes them (same teacher, same seeds), then each configuration
inverts the class token and reports: the fixed validation loss of the class
word (init) and of the best vector, the step it was reached at, the seconds
spent (and how many of them validating), and the teacher's agreement on the
class's IPC-10 images regenerated from the kept vector (the build's own
label step). ``bold`` is examples/style_shift.py's bold-digit source with its
fine-tuned teacher. Prints a Markdown table; writes OUT/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import style_shift  # noqa: E402

from builder.inversion import InversionSettings, invert_class_token  # noqa: E402
from builder.model import generator_info, native_resolution  # noqa: E402
from builder.settings import DEMO_MODEL, BuildSettings, model_defaults, resolve_settings  # noqa: E402
from builder.labelling import class_seeds, render_and_label  # noqa: E402
from builder.patches import make_collages, select_patches  # noqa: E402
from d3mfmt import RenderOptions  # noqa: E402
from d3mfmt.generator import Regenerator, default_dtype, shared_pipeline  # noqa: E402
from d3mfmt.modelpin import model_files, model_identity  # noqa: E402
from d3mfmt.models import resolve_model  # noqa: E402

_D = model_defaults(DEMO_MODEL)
BASE = InversionSettings(steps=_D.ti_steps, lr=_D.ti_lr, batch=_D.ti_batch)  # the built-in model's defaults
CONFIGS = {  # name -> settings (all scored on the same validation triples)
    "default": BASE,
    "lr 1e-4": replace(BASE, lr=1e-4),
    "lr 2e-3": replace(BASE, lr=2e-3),
    "lr 5e-3": replace(BASE, lr=5e-3),
    "stratified t": replace(BASE, timesteps="stratified"),
    "2 vectors": replace(BASE, n_vectors=2),
    "batch 32": replace(BASE, batch=32),
}


def class_collages(src, c: int, teacher, s: BuildSettings, patch_side: int) -> tuple[torch.Tensor, torch.Generator]:
    """build_class's steps 1-3 with its generator; returns the collages and the generator, advanced as in a build."""
    g = torch.Generator().manual_seed(int(np.random.default_rng([s.seed, c, 1]).integers(2**62)))
    images = src.images(c, side=2 * patch_side, limit=s.patches.max_images)
    patches, _ = select_patches(images, c, teacher, s.ipc * s.grid**2, patch_side, s.patches, g, "cpu")
    return make_collages(patches, s.grid), g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", nargs="+", default=["bold", "mnist"])
    ap.add_argument("--classes", type=int, nargs="+", default=[4, 5])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--out", type=Path, default=Path("out/sweep"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    path = resolve_model(DEMO_MODEL)
    pipe = shared_pipeline(path, model_identity(path), "cpu", default_dtype("cpu"))
    rows = []
    for source in args.sources:
        src, teacher_name, teacher, *_ = style_shift.prepare(source, Path("out/style"))
        s = resolve_settings(BuildSettings(model=DEMO_MODEL, teacher=teacher_name, ipc=10), native_resolution(pipe))
        gen = generator_info(s, pipe, model_files(path), default_dtype("cpu"))
        for c in args.classes:
            name = src.classes[c].name
            for config in args.configs:
                collages, g = class_collages(src, c, teacher, s, gen.height // s.grid)
                val_g = torch.Generator().manual_seed(int(np.random.default_rng([s.seed, c, 2]).integers(2**62)))
                t0 = time.perf_counter()
                vectors, _, stats = invert_class_token(pipe, collages, name, gen.prompt_template, gen.placeholder,
                                                       CONFIGS[config], g, val_g)
                seconds = time.perf_counter() - t0
                regen = Regenerator(gen, vectors.astype(np.float16).astype(np.float32)[None],
                                    RenderOptions(device="cpu", dtype=gen.dtype))
                probs, _, _ = render_and_label(regen, 0, class_seeds(s.seed, c, s.ipc), teacher, s.grid, 1.0, None, "cpu")
                row = {"source": source, "class": name, "config": config, **stats, "seconds": seconds,
                       "agreement": float((probs.argmax(1) == c).mean())}
                rows.append(row)
                logging.info("%s %s %-13s val %.4f -> %.4f (%+.1f%%) at step %3d, %.0fs (val %.1fs), agreement %.3f",
                             source, name, config, stats["val_loss_init"], stats["val_loss_best"],
                             100 * (stats["val_loss_best"] / stats["val_loss_init"] - 1), stats["best_step"],
                             seconds, stats["val_seconds"], row["agreement"])
                (args.out / "sweep.json").write_text(json.dumps(rows, indent=1))
    lines = ["| source | class | config | val loss init | val loss best | change | best step | s (val s) | agreement |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['source']} | {r['class']} | {r['config']} | {r['val_loss_init']:.4f} | {r['val_loss_best']:.4f} | "
              f"{100 * (r['val_loss_best'] / r['val_loss_init'] - 1):+.1f}% | {r['best_step']} | "
              f"{r['seconds']:.0f} ({r['val_seconds']:.1f}) | {r['agreement']:.3f} |" for r in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
