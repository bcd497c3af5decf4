"""Measure how recognisable the built-in ``d3m/tiny-mnist`` digits are.

For every class, generate ``--per-class`` single digits (32 px) from
"a photo of handwritten digit <name>" and as many 2×2 collages (64 px) from
"a collage of handwritten digit <name>", with fixed seeds, DDIM (eta 0) and
classifier-free guidance, through ``StableDiffusionPipeline`` loaded from the
shipped folder. The ``mnist-cnn`` teacher (≥ 98% on held-out real digits)
classifies each single digit and each of the four 32-px patches of every
collage. Prints markdown tables (stdout) and writes a preview grid: one row per
class, four singles (shown 2× enlarged) and two collages.

Usage (from the repository root)::

    python examples/measure_builtin_quality.py                     # 100 per class, ~6 min on 2 cores
    python examples/measure_builtin_quality.py --per-class 10      # quick check
    python examples/measure_builtin_quality.py --steps 20 --guidance 3 --no-collages

Seeds: single i of class c uses seed ``seed + 10_000 * c + i``; collage i uses
``seed + 10_000 * c + 5_000 + i``. Latents are drawn on the CPU with
``torch.Generator("cpu").manual_seed(s)`` in float32, one generator per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.teachers import load_teacher  # noqa: E402
from d3mfmt.mnist import MNIST_CLASS_NAMES  # noqa: E402
from d3mfmt.models import BUILTIN_MODELS, resolve_model  # noqa: E402

DEFAULTS = BUILTIN_MODELS["d3m/tiny-mnist"]


@dataclasses.dataclass
class Config:
    model: str = "d3m/tiny-mnist"
    per_class: int = 100
    steps: int = DEFAULTS.steps
    guidance: float = DEFAULTS.guidance_scale
    batch: int = 100  # single images per pipeline call; collages use batch // 4
    seed: int = 0
    threads: int = 2
    preview: str = str(REPO / "docs" / "tiny_mnist_preview.png")
    photo_prompt: str = "a photo of handwritten digit {}"
    collage_prompt: str = "a collage of handwritten digit {}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def initial_latents(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One CPU generator per seed, float32 (the d3mfmt regeneration rule)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(pipe, prompt: str, seeds: list[int], size: int, cfg: Config, batch: int) -> torch.Tensor:
    """Images [N, 3, size, size] in [0, 1] for one prompt, in seed order."""
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (pipe.unet.config.in_channels, size // f, size // f)
    out = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        images = pipe(
            [prompt] * len(chunk), height=size, width=size, num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance, eta=0.0, latents=initial_latents(chunk, shape), output_type="pt",
        ).images
        out.append(images.float().clamp(0, 1))
    return torch.cat(out)


def split_patches(collages: torch.Tensor, grid: int = 2) -> torch.Tensor:
    """[N, C, g*p, g*p] -> [N, g*g, C, p, p], patches row-major."""
    n, c, h, _ = collages.shape
    p = h // grid
    x = collages.reshape(n, c, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, grid * grid, c, p, p)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> uint8 [H, W] (channel mean: the model renders grey)."""
    return (img.mean(0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def preview_grid(singles: list[torch.Tensor], collages: list[torch.Tensor], path: pathlib.Path) -> None:
    """Row per class: 4 singles upscaled 2x, then 2 collages; 4-px grey gaps."""
    from PIL import Image

    gap, cell = 4, 64
    n_single = min(4, len(singles[0]))
    n_coll = min(2, len(collages[0])) if collages else 0
    cols = n_single + n_coll
    canvas = np.full((len(singles) * (cell + gap) + gap, cols * (cell + gap) + gap), 96, np.uint8)
    for r, row in enumerate(singles):
        tiles = [np.kron(to_uint8(im), np.ones((2, 2), np.uint8)) for im in row[:n_single]]
        tiles += [to_uint8(im) for im in collages[r][:n_coll]] if collages else []
        for k, tile in enumerate(tiles):
            y, x = gap + r * (cell + gap), gap + k * (cell + gap)
            canvas[y:y + cell, x:x + cell] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas, mode="L").save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(Config):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    parser.add_argument("--no-collages", action="store_true")
    args = parser.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    torch.set_num_threads(cfg.threads)
    from diffusers import StableDiffusionPipeline

    # 1. load the model through the resolver, and the teacher
    path = resolve_model(cfg.model)
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    teacher = load_teacher("mnist-cnn")
    log(f"model {path}, scheduler {type(pipe.scheduler).__name__}, {cfg.steps} steps, guidance {cfg.guidance}")
    # 2. generate and classify, class by class
    t0 = time.time()
    rows, singles_all, collages_all = [], [], []
    for c, name in enumerate(MNIST_CLASS_NAMES):
        base = cfg.seed + 10_000 * c
        singles = generate(pipe, cfg.photo_prompt.format(name), [base + i for i in range(cfg.per_class)], 32, cfg, cfg.batch)
        single_acc = (teacher(singles).argmax(1) == c).float().mean().item()
        singles_all.append(singles[:4])
        patch_acc = all4 = float("nan")
        if not args.no_collages:
            seeds = [base + 5_000 + i for i in range(cfg.per_class)]
            collages = generate(pipe, cfg.collage_prompt.format(name), seeds, 64, cfg, max(1, cfg.batch // 4))
            correct = (teacher(split_patches(collages).flatten(0, 1)).argmax(1) == c).view(-1, 4)
            patch_acc, all4 = correct.float().mean().item(), correct.all(1).float().mean().item()
            collages_all.append(collages[:2])
        rows.append((name, single_acc, patch_acc, all4))
        log(f"{name}: single {single_acc:.3f}, collage patches {patch_acc:.3f} ({time.time() - t0:.0f} s)")
    # 3. report: markdown tables on stdout, preview grid on disk
    print(f"\n{cfg.model}, {cfg.per_class} per class, DDIM eta 0, {cfg.steps} steps, "
          f"guidance {cfg.guidance}, teacher mnist-cnn\n")
    print("| class | single (32 px) | collage patches (64 px, 2x2) | collages with all 4 right |")
    print("|---|---|---|---|")
    for name, s, p, a in rows:
        print(f"| {name} | {s:.1%} | {p:.1%} | {a:.1%} |")
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(f"| **all** | **{mean(1):.1%}** | **{mean(2):.1%}** | **{mean(3):.1%}** |")
    preview_grid(singles_all, collages_all, pathlib.Path(cfg.preview))
    log(f"wrote {cfg.preview}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
