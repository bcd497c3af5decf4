"""Benchmark D3MDataset: first-epoch rendering vs a raw diffusers call, cached epochs vs PNG files.

Usage:
    python examples/bench_dataset.py [--ipc 10] [--repeats 3] [--workers 2] [--ipc-512 8] [--skip-64]

On the built-in model ``d3m/tiny-mnist`` (CPU): an archive whose class
embeddings are the text encoder's own embeddings of the digit words (so it
renders digits without a builder run), 10 classes, 2x2 collages of 64 px.

Rows (medians over --repeats runs, all in this one process and machine):

1. raw pipeline: ``StableDiffusionPipeline(prompt_embeds=..., latents=...)``,
   same batch size, steps, guidance and resolution, torch's default threads;
2. raw pipeline, one thread (what D3MDataset uses on the CPU for batch-invariant pixels);
3. D3MDataset first epoch through a DataLoader with --workers workers, empty cache;
4. D3MDataset cached epoch (patches through a DataLoader, batch 256), 0 and --workers workers;
5. the same patches as PNG files in an ImageFolder layout, read with PIL, same loader settings.

Then the cached read path at 512 px (SD 1.5's size; 256-px patches, batch
64): a random pipeline of ``examples/sd15_random.py``'s family at toy widths
with a 16x VAE (cheap to render on a CPU; the point is reading), 10 classes x
--ipc-512 images, materialised first:

6. a new process's first cached epoch (each file read and verified once), 0 workers;
7. cached epochs with the in-memory LRU off (``memory_cache_bytes = 0``: every
   patch reads its file, as at ImageNet scale), 0 and --workers workers;
8. cached epochs with the default LRU (256 MiB: here every image fits), 0 and --workers workers;
9. the same patches as PNG files, 0 and --workers workers.

Peak RSS of this process and of its children is printed last.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import d3mfmt
from d3mfmt import ClassInfo, DatasetInfo, EmbeddingInfo, GeneratorInfo, LabelEncoding, Manifest, ModelRef
from d3mfmt.dataset import D3MDataset
from d3mfmt.export import export_images
from d3mfmt.generator import initial_latents, shared_pipeline, single_thread
from d3mfmt.mnist import MNIST_CLASS_NAMES
from d3mfmt.modelpin import model_identity
from d3mfmt.models import BUILTIN_MODELS, resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.sd15_random import SDConfig, build_random_sd  # noqa: E402

CPU = d3mfmt.RenderOptions(device="cpu")  # every render here is on the CPU


SIZE_512 = SDConfig((32, 64), 2, (16, 16, 16, 32, 32), 1, 32, 2, 2, 64, 512, norm_groups=16)  # 16x VAE: 32x32 latents


def word_archive(ipc: int, grid: int = 2, model: str = "d3m/tiny-mnist", size: int | None = None,
                 steps: int | None = None, guidance: float | None = None) -> d3mfmt.Archive:
    """An archive for ``model`` (default the built-in one, its own settings) whose embeddings are the digit words' rows."""
    spec = BUILTIN_MODELS["d3m/tiny-mnist"]
    path = resolve_model(model)
    pipe = shared_pipeline(path, model_identity(path), "cpu", "float32")
    ids = [pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in MNIST_CLASS_NAMES]
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float().numpy()
    size = spec.collage_resolution if size is None else size
    factor = pipe.vae_scale_factor
    import json

    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    manifest = Manifest(
        dataset=DatasetInfo("bench-words", tuple(ClassInfo(str(i), n) for i, n in enumerate(MNIST_CLASS_NAMES)), ipc, grid),
        generator=GeneratorInfo(
            model=ModelRef(model, None, model_identity(path)),
            scheduler="DDIMScheduler",
            scheduler_config={k: v for k, v in config.items() if not k.startswith("_")},
            steps=spec.steps if steps is None else steps,
            guidance_scale=spec.guidance_scale if guidance is None else guidance,
            height=size,
            width=size,
            latent_shape=(4, size // factor, size // factor),
            prompt_template=spec.collage_template.replace("{}", "{token}"),
        ),
        embeddings=EmbeddingInfo(1, table.shape[1], "float32"),
        labels=LabelEncoding("hard", 1, None),
    )
    rows = len(MNIST_CLASS_NAMES) * ipc * grid * grid
    probs = np.eye(10, dtype=np.float32)[np.arange(rows) // (ipc * grid * grid)]
    return d3mfmt.Archive(
        manifest,
        embeddings=table[ids][:, None, :].astype(np.float32),
        seeds=np.arange(10 * ipc, dtype=np.int64).reshape(10, ipc),
        labels=d3mfmt.encode_labels(probs, manifest.labels),
    )


def raw_pipeline_seconds(archive: d3mfmt.Archive, batch: int, threads: int | None) -> float:
    """Render every image with a plain StableDiffusionPipeline call per batch."""
    from d3mfmt.generator import Regenerator

    regen = Regenerator(archive.manifest.generator, archive.embeddings, CPU)
    gen = archive.manifest.generator
    prompts = [regen.prompt_embeds(c) for c in range(len(archive.seeds))]
    negative = regen.negative_embeds()
    pipe = regen.pipe
    ctx = single_thread() if threads == 1 else _null()
    start = time.perf_counter()
    with ctx, torch.no_grad():
        for c, seeds in enumerate(archive.seeds.tolist()):
            for s in range(0, len(seeds), batch):
                chunk = seeds[s : s + batch]
                pipe(
                    prompt_embeds=prompts[c].expand(len(chunk), -1, -1),
                    negative_prompt_embeds=negative.expand(len(chunk), -1, -1),
                    latents=initial_latents(chunk, gen.latent_shape),
                    num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale, eta=0.0,
                    height=gen.height, width=gen.width, output_type="pt",
                )
    return time.perf_counter() - start


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class PngFolder(Dataset):
    """Patches stored as PNG files (the ImageFolder baseline), as float tensors."""

    def __init__(self, root: Path):
        self.files = sorted(root.glob("*/*.png"))
        self.classes = {name: k for k, name in enumerate(sorted({f.parent.name for f in self.files}))}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, k):
        f = self.files[k]
        x = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1).float().div_(255)
        return x, self.classes[f.parent.name]


def epoch_rate(dataset, workers: int, batch: int = 256) -> float:
    """Items per second of one full pass through a DataLoader."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=False)
    start = time.perf_counter()
    n = sum(len(b[0]) for b in loader)
    return n / (time.perf_counter() - start)


def bench_64(args, work: Path) -> tuple[list, list[str]]:
    """Rows 1-5 on the built-in model: (rows, notes)."""
    archive_path = work / "words.d3m"
    archive = word_archive(args.ipc)
    d3mfmt.save_file(archive, archive_path)
    n_images = archive.manifest.dataset.num_images
    rows = []
    # 1-2. raw diffusers calls, default threads and one thread
    for threads, name in [(None, f"raw StableDiffusionPipeline ({torch.get_num_threads()} threads)"),
                          (1, "raw StableDiffusionPipeline (1 thread)")]:
        t = statistics.median(raw_pipeline_seconds(archive, args.render_batch, threads) for _ in range(args.repeats))
        rows.append((name, n_images / t, "images/s"))
    raw_default, raw_single = rows[0][1], rows[1][1]
    # 3. first epoch through D3MDataset, empty cache each time
    for workers in sorted({0, args.workers}):
        times = []
        for r in range(args.repeats):
            cache = work / f"cache-first-{workers}-{r}"
            ds = D3MDataset(archive_path, cache_dir=cache, render=CPU, render_batch=args.render_batch, unit="image")
            start = time.perf_counter()
            for _ in DataLoader(ds, batch_size=args.render_batch, num_workers=workers):
                pass
            times.append(time.perf_counter() - start)
        rows.append((f"D3MDataset first epoch, {workers} workers", n_images / statistics.median(times), "images/s"))
    # 4-5. cached epochs of patches, and the same patches as PNG files
    ds = D3MDataset(archive_path, cache_dir=work / "cache-first-0-0", render=CPU).materialize(progress=False)
    rows += cached_vs_png(ds, work / "png", args.workers, args.repeats, batch=256, label="")
    best_first = max(rate for name, rate, _ in rows if name.startswith("D3MDataset first"))
    notes = [
        f"64 px: d3m/tiny-mnist, 10 classes x IPC {args.ipc}, 2x2 collages ({len(ds)} 32-px patches), "
        f"{archive.manifest.generator.steps} DDIM steps, guidance {archive.manifest.generator.guidance_scale}, "
        f"render batch {args.render_batch}, cached batch 256",
        f"first epoch (best) / raw pipeline: {best_first / raw_default:.2f} (vs one-thread raw: "
        f"{best_first / raw_single:.2f})",
    ]
    return rows, notes


def cached_vs_png(ds, png_root: Path, workers: int, repeats: int, batch: int, label: str,
                  lru_off: bool = False) -> list:
    """Cached epochs of ``ds`` (with the LRU off too when ``lru_off``), then the same patches as PNGs."""
    rows = []
    settings = [("LRU off", 0), ("default LRU", ds.memory_cache_bytes)] if lru_off else [("", ds.memory_cache_bytes)]
    for what, bound in settings:
        ds.memory_cache_bytes = bound
        for w in sorted({0, workers}):
            rate = statistics.median(epoch_rate(ds, w, batch) for _ in range(repeats))
            name = f"{label}D3MDataset cached epoch{', ' + what if what else ''}, {w} workers"
            rows.append((name, rate, "patches/s"))
    export_images(ds, png_root, progress=False)
    png = PngFolder(png_root)
    for w in sorted({0, workers}):
        rate = statistics.median(epoch_rate(png, w, batch) for _ in range(repeats))
        rows.append((f"{label}PNG ImageFolder epoch, {w} workers", rate, "patches/s"))
    return rows


def bench_512(args, work: Path) -> tuple[list, list[str]]:
    """Rows 6-9: the cached read path at 512 px against PNG files of the same patches."""
    model = build_random_sd(work / "model-512", SIZE_512, dtype=torch.float32)
    archive_path = work / "words-512.d3m"
    d3mfmt.save_file(word_archive(args.ipc_512, model=str(model), size=512, steps=2, guidance=2.0), archive_path)
    cache = work / "cache-512"
    start = time.perf_counter()
    ds = D3MDataset(archive_path, cache_dir=cache, render=CPU).materialize(progress=False)
    render_s = time.perf_counter() - start
    # 6. a new process reads each file once with its tag check (a fresh dataset stands for it)
    times = []
    for _ in range(args.repeats):
        fresh = D3MDataset(archive_path, cache_dir=cache, render=CPU)
        fresh.memory_cache_bytes = 0
        times.append(len(fresh) / epoch_rate(fresh, 0, 64))
    rows = [("512 px: D3MDataset first cached epoch of a process (verifies each file), 0 workers",
             len(ds) / statistics.median(times), "patches/s")]
    # 7-9. materialised (verified here, so forked workers do not hash again), LRU off and on; PNGs
    rows += cached_vs_png(ds, work / "png-512", args.workers, args.repeats, batch=64, label="512 px: ", lru_off=True)
    png_bytes = sum(f.stat().st_size for f in (work / "png-512").rglob("*.png")) / len(ds)
    patch = 512 // ds.grid
    notes = [f"512 px: random toy SD-family model (16x VAE), 10 classes x IPC {args.ipc_512}, 2x2 collages "
             f"({len(ds)} {patch}-px patches, {3 * patch * patch:,} bytes raw, {png_bytes:,.0f} bytes as PNG), "
             f"2 DDIM steps, rendered in {render_s:.0f} s; cached batch 64"]
    for w in sorted({0, args.workers}):
        ratio = {name: rate for name, rate, _ in rows if name.endswith(f", {w} workers")}
        png = ratio[f"512 px: PNG ImageFolder epoch, {w} workers"]
        lru_off = ratio[f"512 px: D3MDataset cached epoch, LRU off, {w} workers"]
        lru_on = ratio[f"512 px: D3MDataset cached epoch, default LRU, {w} workers"]
        notes.append(f"512 px, {w} workers: cached / PNG = {lru_off / png:.2f} (LRU off), {lru_on / png:.2f} (default)")
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--render-batch", type=int, default=10)
    ap.add_argument("--ipc-512", type=int, default=8, help="images per class of the 512-px archive")
    ap.add_argument("--skip-64", action="store_true", help="only the 512-px rows")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="d3m-bench-"))
    rows, notes = bench_64(args, work) if not args.skip_64 else ([], [])
    more_rows, more_notes = bench_512(args, work)
    rows, notes = rows + more_rows, notes + more_notes
    print(f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    print("| what | rate | unit |")
    print("|---|---:|---|")
    for name, rate, unit in rows:
        print(f"| {name} | {rate:,.1f} | {unit} |")
    print()
    for note in notes:
        print(note)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: this process {own:.0f} MiB, largest worker {kids:.0f} MiB")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
