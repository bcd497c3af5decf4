"""How many images ranks render in the first epoch without materialize(): patch-level vs image-level samplers.

Usage:
    python examples/simulate_rank_renders.py [--classes 1000] [--ipc 10] [--grid 2] [--batch 64]
                                             [--ranks 8 64]

Nothing is rendered: the samplers run for real over a real ``D3MDataset`` of
a synthetic archive of that shape (ImageNet-1k at IPC 10 with 2x2 collages by
default), and each rank's first-epoch index stream is replayed. Two counts,
as fractions of the distinct images:

- *no reuse*: each rank renders every image its epoch touches once (what
  happens when ranks cannot see each other's renders in time, e.g. a rank's
  DataLoader workers prefetching, or caches that are not shared);
- *lockstep, shared cache*: ranks take one batch of ``--batch`` items per step
  together (as DDP makes them); at step t a rank renders the images of its
  batch that no rank finished before step t, so two ranks needing one image
  in the same step both render it.

Rows: torch's ``DistributedSampler`` over patch indices (the default recipe)
and ``d3mfmt.D3MDistributedSampler`` (whole images per rank).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from torch.utils.data import DistributedSampler

import d3mfmt
from d3mfmt import ClassInfo, D3MDataset, DatasetInfo, EmbeddingInfo, GeneratorInfo, LabelEncoding, Manifest, ModelRef
from d3mfmt.distributed import D3MDistributedSampler


def synthetic_archive(num_classes: int, ipc: int, grid: int) -> d3mfmt.Archive:
    """An archive of the given shape (hard labels, random embeddings); never rendered here."""
    size = 64 * grid
    manifest = Manifest(
        dataset=DatasetInfo("simulated", tuple(ClassInfo(f"c{c}", f"class {c}") for c in range(num_classes)), ipc,
                            grid),
        generator=GeneratorInfo(
            model=ModelRef("d3m/tiny-mnist"), scheduler="DDIMScheduler", scheduler_config={"num_train_timesteps": 1000},
            steps=20, guidance_scale=2.0, height=size, width=size, latent_shape=(4, size // 4, size // 4),
            prompt_template="a photo of {token}",
        ),
        embeddings=EmbeddingInfo(1, 64, "float16"),  # the built-in model's width (SPEC geometry rule)
        labels=LabelEncoding("hard", 1, None),
    )
    rows = num_classes * ipc * grid * grid
    probs = np.zeros((rows, num_classes), np.float32)
    probs[np.arange(rows), np.arange(rows) // (ipc * grid * grid)] = 1.0
    rng = np.random.default_rng(0)
    return d3mfmt.Archive(manifest, embeddings=rng.normal(size=(num_classes, 1, 64)).astype(np.float16),
                          seeds=np.arange(num_classes * ipc, dtype=np.int64).reshape(num_classes, ipc),
                          labels=d3mfmt.encode_labels(probs, manifest.labels))


def first_epoch_renders(streams: list[list[int]], per_image: int, batch: int) -> tuple[int, int]:
    """(renders with no reuse across ranks, renders in lockstep with a shared cache) for ranks' index streams."""
    no_reuse = sum(len({k // per_image for k in stream}) for stream in streams)
    cached: set[int] = set()
    lockstep = 0
    for start in range(0, max(len(s) for s in streams), batch):
        now = [{k // per_image for k in stream[start : start + batch]} - cached for stream in streams]
        lockstep += sum(len(images) for images in now)
        cached.update(*now)
    return no_reuse, lockstep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--grid", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="items per rank per step")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="d3m-sim-") as work:
        path = Path(work) / "simulated.d3m"
        d3mfmt.save_file(synthetic_archive(args.classes, args.ipc, args.grid), path)
        never_rendered = d3mfmt.RenderLimits(evaluations=None, latent_pixels=None, per_image=None, total=None)
        ds = D3MDataset(path, render=d3mfmt.RenderOptions(device="cpu", limits=never_rendered))
        n_images = ds.num_classes * ds.ipc
        print(f"{ds.num_classes} classes x IPC {ds.ipc}, {args.grid}x{args.grid} patches: {n_images:,} images, "
              f"{len(ds):,} patches; {args.batch} patches per rank per step; first epoch (epoch 0, seed 0)")
        print("| ranks | sampler | renders, no reuse (x distinct) | renders, lockstep shared cache (x distinct) |")
        print("|---:|---|---:|---:|")
        for world in args.ranks:
            for name, make in (("torch DistributedSampler (patches)", DistributedSampler),
                               ("d3mfmt D3MDistributedSampler (images)", D3MDistributedSampler)):
                streams = [list(make(ds, num_replicas=world, rank=r, shuffle=True, seed=0)) for r in range(world)]
                no_reuse, lockstep = first_epoch_renders(streams, ds.items_per_image, args.batch)
                print(f"| {world} | {name} | {no_reuse:,} ({no_reuse / n_images:.2f}x) | "
                      f"{lockstep:,} ({lockstep / n_images:.2f}x) |")


if __name__ == "__main__":
    main()
