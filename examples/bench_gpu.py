"""Benchmark the render path at Stable Diffusion 1.5 size: raw diffusers vs D3MDataset, drift, TI, builder cost.

Usage:
    python examples/bench_gpu.py --out bench_gpu.json            # one GPU, < 6 minutes on an H100
    python examples/bench_gpu.py --quick --out bench_quick.json  # the same code on the CPU, toy size

Full mode (CUDA, fp16): a randomly initialised pipeline of SD 1.5's
architecture (examples/sd15_random.py), 512 px, 30 DDIM steps, guidance 4.
Quick mode: the same family at toy widths on the CPU (one thread for every
row), 32 px, 2 steps. The numbers of the two modes are not comparable; the
JSON records which ran.

Measured, in this order (all in this one process):

1. raw ``StableDiffusionPipeline`` images/s at each batch size (the plain
   diffusers pipeline as a user loads it; on the CPU on one thread);
2. ``D3MDataset.materialize()`` images/s on a 100-class IPC-10 archive
   (render_batch 32, classes mixed in every batch), eager and with
   ``compile=True`` (after a warm-up batch, whose time is reported apart);
3. pixel drift: the same images rendered at batch 1 (reference), 8 (one
   class), 8 (eight classes) and 32 (mixed): the largest 8-bit pixel
   difference and the largest fingerprint difference (4x4, as ``d3m-inspect verify``);
4. textual-inversion steps/s at batch 8 (a whole run's time, set-up included);
5. the builder's seconds per class by stage (2 classes, the second timed),
   extrapolated to ImageNet-1k IPC 10 at the builder's Stable Diffusion
   defaults (builder/defaults.py, what examples/build_imagenet_sd15.sh runs):
   select scaled to ``PatchSettings.max_images`` real images, invert = the
   default TI steps at the TI rate measured at the default TI batch, label
   scaled to IPC 10 and to the default DDIM steps; in GPU-hours;
6. peak GPU memory (CUDA) or peak RSS (CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.sd15_random import SD15, TINY, TEACHER, SDConfig, build_random_sd, make_two_class_folder  # noqa: E402

IMAGENET_CLASSES, IMAGENET_IPC = 1000, 10


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run's sizes (FULL on a GPU, QUICK on the CPU)."""

    model: SDConfig
    device: str
    dtype: str
    resolution: int
    steps: int
    guidance: float
    raw_batches: tuple[int, ...]
    raw_calls_at_1: int  # timed calls at batch 1 (every other batch size: one call)
    classes: int
    ipc: int
    render_batch: int
    dataset_images: int  # images materialize() renders while timed (a multiple of render_batch)
    compile: bool
    ti_batch: int
    ti_steps: int
    build_ipc: int
    build_ti_steps: int
    build_max_images: int


FULL = BenchSettings(SD15, "cuda", "float16", 512, 30, 4.0, (1, 8, 16, 32), 2, 100, 10, 32, 128, True,
                     8, 20, 10, 20, 20)
QUICK = BenchSettings(TINY, "cpu", "float32", 32, 2, 4.0, (1, 8, 16, 32), 2, 100, 10, 32, 64, False,
                      8, 4, 2, 2, 4)


class Clock:
    """Wall seconds of a block, synchronising CUDA first and last."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


def bench_archive(pipe, model_dir: Path, s: BenchSettings, path: Path) -> Path:
    """A 100-class archive for ``model_dir``: embeddings are random rows of the model's token table."""
    import d3mfmt
    from d3mfmt import ClassInfo, DatasetInfo, EmbeddingInfo, GeneratorInfo, LabelEncoding, Manifest, ModelRef
    from d3mfmt.modelpin import model_identity

    rng = np.random.default_rng(0)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float().cpu().numpy()
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    factor = pipe.vae_scale_factor
    manifest = Manifest(
        dataset=DatasetInfo("bench-gpu", tuple(ClassInfo(f"c{c}", f"class {c}") for c in range(s.classes)), s.ipc, 2),
        generator=GeneratorInfo(
            model=ModelRef(str(model_dir), None, model_identity(model_dir)),
            scheduler="DDIMScheduler", scheduler_config=json.loads(json.dumps(config)), steps=s.steps,
            guidance_scale=s.guidance, height=s.resolution, width=s.resolution,
            latent_shape=(4, s.resolution // factor, s.resolution // factor), prompt_template="a photo of {token}",
            dtype=s.dtype,
        ),
        embeddings=EmbeddingInfo(1, table.shape[1], "float16"),
        labels=LabelEncoding(k=5),
        fingerprint_size=None,
    )
    rows = s.classes * s.ipc * 4
    probs = rng.dirichlet(np.ones(s.classes) * 0.1, rows)
    archive = d3mfmt.Archive(
        manifest,
        embeddings=table[rng.integers(0, len(table), (s.classes, 1))].astype(np.float16),
        seeds=rng.integers(0, 2**62, (s.classes, s.ipc), dtype=np.int64),
        labels=d3mfmt.encode_labels(probs, manifest.labels),
        fingerprints=None,
    )
    d3mfmt.save_file(archive, path)
    return path


def raw_pipeline_rates(model_dir: Path, prompt, negative, s: BenchSettings) -> dict:
    """Images/s of the plain diffusers pipeline (fp16 everywhere on CUDA, as users load it) by batch size.

    On the CPU it runs on one thread, like D3MDataset: measured here, torch's
    default 2 threads on a shared 2-core machine ran the same calls up to 20x
    slower (threads waiting on each other), which would flatter the dataset.
    """
    from diffusers import StableDiffusionPipeline

    from d3mfmt.generator import DTYPES, _quiet_loading, initial_latents, single_thread

    with _quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=DTYPES[s.dtype], safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
    pipe.to(s.device)
    pipe.set_progress_bar_config(disable=True)
    latent_shape = (4, s.resolution // pipe.vae_scale_factor, s.resolution // pipe.vae_scale_factor)

    def call(b: int):
        with torch.no_grad():
            return pipe(prompt_embeds=prompt.expand(b, -1, -1).to(s.device, pipe.unet.dtype),
                        negative_prompt_embeds=negative.expand(b, -1, -1).to(s.device, pipe.unet.dtype),
                        latents=initial_latents(range(b), latent_shape).to(s.device, pipe.unet.dtype),
                        num_inference_steps=s.steps, guidance_scale=s.guidance, eta=0.0, height=s.resolution,
                        width=s.resolution, output_type="pt").images

    rates, nonfinite = {}, 0
    with single_thread() if torch.device(s.device).type == "cpu" else contextlib.nullcontext():
        call(1)  # warm-up: kernels, allocator
        for b in s.raw_batches:
            calls = s.raw_calls_at_1 if b == 1 else 1
            with Clock(s.device) as clock:
                for _ in range(calls):
                    nonfinite += int((~torch.isfinite(call(b))).any(dim=(1, 2, 3)).sum())
            rates[str(b)] = b * calls / clock.seconds
    del pipe
    return {"rates": rates, "nonfinite_images": nonfinite}


def dataset_rate(archive_path: Path, cache: Path, s: BenchSettings, compile: bool) -> dict:
    """materialize() images/s after one warm-up batch (the compile happens there)."""
    from d3mfmt import D3MDataset, RenderOptions

    ds = D3MDataset(archive_path, cache_dir=cache, render=RenderOptions(device=s.device, dtype=s.dtype, compile=compile),
                    render_batch=s.render_batch)
    with Clock(s.device) as warm:
        ds.materialize(progress=False, images=range(s.render_batch))
    timed = range(s.render_batch, s.render_batch + s.dataset_images)
    with Clock(s.device) as clock:
        ds.materialize(progress=False, images=timed)
    return {"images_per_s": s.dataset_images / clock.seconds, "warmup_s": warm.seconds,
            "fp32_redecodes": ds.regenerator.fp32_redecodes}


def drift(archive, s: BenchSettings, compile: bool = False) -> dict:
    """Max 8-bit pixel and fingerprint differences of the same images across batch sizes and batch-mates."""
    from d3mfmt import RenderOptions
    from d3mfmt.generator import Regenerator, fingerprint

    regen = Regenerator(archive.manifest.generator, archive.embeddings, RenderOptions(device=s.device, dtype=s.dtype))
    seeds = archive.seeds
    one_class = [(0, int(seeds[0, i])) for i in range(8)]
    mixed = [(c, int(seeds[c, 1])) for c in range(1, 9)]
    others = [(c, int(seeds[c, 2])) for c in range(10, 26)]
    reference = regen.render_pairs(one_class[:1])  # keep batch-1 renders of all 16
    reference = torch.cat([reference] + [regen.render_pairs([p]) for p in one_class[1:] + mixed])
    runs = {"batch8_one_class": (one_class, slice(0, 8)), "batch8_mixed_classes": (mixed, slice(8, 16)),
            "batch32_mixed_classes": (one_class + mixed + others, slice(0, 16))}
    if compile:
        regen = Regenerator(archive.manifest.generator, archive.embeddings,
                            RenderOptions(device=s.device, dtype=s.dtype, compile=True))
        runs["batch32_compiled"] = runs["batch32_mixed_classes"]
    out = {}
    for name, (pairs, ref_rows) in runs.items():
        got = regen.render_pairs(pairs)[:16 if len(pairs) > 8 else 8]
        ref = reference[ref_rows]
        levels = int(((got - ref).abs() * 255).round().max())
        prints = np.abs(fingerprint(got, 4).astype(int) - fingerprint(ref, 4).astype(int)).max()
        out[name] = {"max_pixel_diff_levels": levels, "max_fingerprint_drift": int(prints)}
    return out


def ti_rate(pipe, s: BenchSettings, batch: int) -> float:
    """Textual-inversion steps/s at ``batch``, after a 1-step warm-up run (set-up cost included: conservative)."""
    from builder.inversion import InversionSettings, invert_class_token
    from builder.settings import STABLE_DIFFUSION

    collages = torch.rand((batch, 3, s.resolution, s.resolution), generator=torch.Generator().manual_seed(0))
    for steps in (1, s.ti_steps):
        settings = InversionSettings(steps=steps, batch=batch, lr=STABLE_DIFFUSION.ti_lr)
        with Clock(s.device) as clock:
            invert_class_token(pipe, collages, "object", "a photo of {token}", "{token}", settings,
                               torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    return s.ti_steps / clock.seconds


def builder_seconds(model_dir: Path, work: Path, s: BenchSettings) -> dict:
    """Seconds per class by stage of a real 2-class build (the second class: no first-use costs)."""
    from builder.inversion import InversionSettings
    from builder.patches import PatchSettings
    from builder.pipeline import build
    from builder.settings import BuildSettings, RunOptions
    from builder.sources import ImageFolderSource

    data = make_two_class_folder(work / "data", per_class=s.build_max_images, side=s.resolution // 2)
    settings = BuildSettings(
        model=str(model_dir), teacher=TEACHER, ipc=s.build_ipc, grid=2, resolution=s.resolution, steps=s.steps,
        guidance_scale=s.guidance, prompt_template="a photo of {token}",
        patches=PatchSettings(n_crops=5, max_images=s.build_max_images),
        inversion=InversionSettings(steps=s.build_ti_steps, batch=s.ti_batch),  # lr: the model's default
    )
    wd = build(ImageFolderSource(data), settings, work / "work", run=RunOptions(device=s.device, progress=False))
    return wd.load_class(1)[1]["seconds"]


def imagenet_hours(stages: dict, ti_steps_per_s_default_batch: float, s: BenchSettings) -> dict:
    """Per-class seconds at ImageNet-1k IPC-10 with the builder's SD defaults, and GPU-hours for 1000 classes."""
    from builder.patches import PatchSettings
    from builder.settings import STABLE_DIFFUSION

    per_class = {
        "select": stages["select"] * PatchSettings().max_images / s.build_max_images,
        "invert": STABLE_DIFFUSION.ti_steps / ti_steps_per_s_default_batch,
        "label": stages["label"] * IMAGENET_IPC / s.build_ipc * STABLE_DIFFUSION.steps / s.steps,
    }
    return {"seconds_per_class": per_class, "gpu_hours": sum(per_class.values()) * IMAGENET_CLASSES / 3600}


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    n = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {n} thread{'' if n == 1 else 's'}"


def peak_memory_gib(device: str) -> dict:
    if torch.device(device).type == "cuda":
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(torch.device(device)) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(s: BenchSettings, workdir: Path, mode: str, log=print) -> dict:
    """All measurements; returns the JSON document."""
    import d3mfmt
    from d3mfmt.generator import shared_pipeline
    from d3mfmt.modelpin import model_identity

    t_start = time.perf_counter()
    # 1. the model: SD 1.5's architecture, random weights, fp16 on disk
    with torch.device(s.device):
        model_dir = build_random_sd(workdir / "model", s.model)
    pipe = shared_pipeline(model_dir, model_identity(model_dir), s.device, s.dtype)
    construct_s = time.perf_counter() - t_start
    log(f"model built and loaded in {construct_s:.0f}s")
    # 2. raw pipeline
    archive_path = bench_archive(pipe, model_dir, s, workdir / "bench.d3m")
    archive = d3mfmt.load_file(archive_path)
    from d3mfmt.generator import Regenerator

    render = d3mfmt.RenderOptions(device=s.device, dtype=s.dtype)
    regen = Regenerator(archive.manifest.generator, archive.embeddings, render)
    raw = raw_pipeline_rates(model_dir, regen.prompt_embeds(0), regen.negative_embeds(), s)
    log(f"raw pipeline: {raw}")
    # 3. D3MDataset.materialize(), eager and compiled
    dataset = {"eager": dataset_rate(archive_path, workdir / "cache-eager", s, compile=False)}
    if s.compile:
        dataset["compiled"] = dataset_rate(archive_path, workdir / "cache-compiled", s, compile=True)
    log(f"dataset: {dataset}")
    # 4. drift across batch sizes and batch-mates
    drifts = drift(archive, s, compile=s.compile)
    log(f"drift: {drifts}")
    # 5. textual inversion, then a real 2-class build
    from builder.settings import STABLE_DIFFUSION

    ti = ti_rate(pipe, s, s.ti_batch)
    ti_default = ti if STABLE_DIFFUSION.ti_batch == s.ti_batch else ti_rate(pipe, s, STABLE_DIFFUSION.ti_batch)
    stages = builder_seconds(model_dir, workdir / "build", s)
    hours = imagenet_hours(stages, ti_default, s)
    best_raw = max(raw["rates"].values())
    result = {
        "mode": mode,
        "device": device_name(s.device),
        "settings": asdict(s),
        "raw_images_per_s": raw["rates"],
        "raw_nonfinite_images": raw["nonfinite_images"],
        "dataset_images_per_s": {k: v["images_per_s"] for k, v in dataset.items()},
        "dataset_warmup_s": {k: v["warmup_s"] for k, v in dataset.items()},
        "dataset_fp32_redecodes": {k: v["fp32_redecodes"] for k, v in dataset.items()},
        "dataset_vs_best_raw": {k: v["images_per_s"] / best_raw for k, v in dataset.items()},
        "max_pixel_diff_levels": max(d["max_pixel_diff_levels"] for d in drifts.values()),
        "max_fingerprint_drift": max(d["max_fingerprint_drift"] for d in drifts.values()),
        "drift": drifts,
        "ti_steps_per_s": ti,
        "ti_steps_per_s_default_batch": {"batch": STABLE_DIFFUSION.ti_batch, "steps_per_s": ti_default},
        "builder_seconds_per_class": stages,
        "imagenet_ipc10_seconds_per_class": hours["seconds_per_class"],
        "imagenet_ipc10_gpu_hours": hours["gpu_hours"],
        "construct_s": construct_s,
        "total_s": time.perf_counter() - t_start,
        "torch": torch.__version__,
        "d3mfmt": d3mfmt.__version__,
        **peak_memory_gib(s.device),
    }
    return result


def table(r: dict) -> str:
    """The one table this script prints."""
    rows = [("device", r["device"]), ("mode", r["mode"])]
    rows += [(f"raw pipeline, batch {b} (img/s)", f"{v:.2f}") for b, v in r["raw_images_per_s"].items()]
    rows += [(f"D3MDataset.materialize(), {k} (img/s)", f"{v:.2f} ({r['dataset_vs_best_raw'][k]:.2f}x best raw)")
             for k, v in r["dataset_images_per_s"].items()]
    rows += [(f"  warm-up batch, {k} (s)", f"{v:.1f}") for k, v in r["dataset_warmup_s"].items()]
    rows += [("max 8-bit pixel diff across batches", str(r["max_pixel_diff_levels"])),
             ("max fingerprint drift (tolerance 8)", str(r["max_fingerprint_drift"])),
             (f"TI steps/s (batch {r['settings']['ti_batch']})", f"{r['ti_steps_per_s']:.2f}"),
             (f"TI steps/s (batch {r['ti_steps_per_s_default_batch']['batch']}, the builder's default)",
              f"{r['ti_steps_per_s_default_batch']['steps_per_s']:.2f}")]
    rows += [(f"builder {k} (s/class, measured)", f"{v:.1f}") for k, v in r["builder_seconds_per_class"].items()]
    rows += [(f"ImageNet-1k IPC10 {k} (s/class)", f"{v:.1f}") for k, v in r["imagenet_ipc10_seconds_per_class"].items()]
    rows += [("ImageNet-1k IPC10 (GPU-hours)", f"{r['imagenet_ipc10_gpu_hours']:.1f}")]
    mem = "peak_gpu_memory_gib" if "peak_gpu_memory_gib" in r else "peak_rss_gib"
    rows += [(mem.replace("_", " "), f"{r[mem]:.1f}"), ("total (s)", f"{r['total_s']:.0f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy size on the CPU (the script's own smoke test)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--device", help="override the mode's device (e.g. cuda:1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile=True measurement")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.device:
        s = replace(s, device=args.device)
    if args.no_compile:
        s = replace(s, compile=False)
    if torch.device(s.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --quick for the CPU smoke version")
    if torch.device(s.device).type == "cpu":
        torch.set_num_threads(1)  # every CPU row on one thread: comparable rows on a shared machine
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        result = run(s, Path(tmp), "quick" if args.quick else "full", log=lambda m: print(m, file=sys.stderr))
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(table(result))


if __name__ == "__main__":
    main()
