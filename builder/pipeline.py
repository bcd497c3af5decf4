"""The D3M build: real images -> .d3m, one class at a time, resumable and shardable.

Per class (independent of every other class, so shards agree with a single run):

1. load the class's real images;
2. select the grid²·IPC most informative patches with the teacher;
3. tile them into IPC collages;
4. textual inversion: learn the class token on those collages;
5. seeds: IPC per class (optionally the best of M candidates each);
6. regenerate every image through d3mfmt's generator, split into patches,
   teacher -> soft label per patch, fingerprint per image;
7. checkpoint the class in the work directory (atomic write).

When every class is done the archive is written (builder/assemble.py).

Example:
    >>> from builder.pipeline import build_archive
    >>> from builder.assemble import label_encoding
    >>> from builder.settings import demo_settings
    >>> from builder.sources import MnistSource
    >>> result = build_archive(MnistSource("train"), demo_settings(ipc=1), Path("mnist_ipc1.d3m"),
    ...                        labels=label_encoding())                           # doctest: +SKIP
    >>> print("\\n".join(result.summary))                                         # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from d3mfmt import D3MError, GeneratorInfo, LabelEncoding, Manifest, ModelRef, RenderOptions
from d3mfmt.agreement import LOW_AGREEMENT_FLOOR
from d3mfmt.devices import check_device
from d3mfmt.generator import Regenerator, default_dtype, shared_pipeline
from d3mfmt.manifest import generator_to_dict
from d3mfmt.modelpin import model_identity
from d3mfmt.models import resolve_model
from d3mfmt.terminal import printable

from .assemble import (BuildResult, archive_manifest, check_labels, enforce_min_agreement, merge_flags,
                       summarize_build, write_archive)
from .guards import check_class_order, domain_message, domain_problems, teacher_confusion
from .inversion import invert_class_token
from .labelling import choose_seeds, class_generator, class_seeds, render_and_label
from .patches import make_collages, select_patches
from .settings import BuildSettings, RunOptions, check_settings, resolve_settings
from .shards import shard_classes, shard_device
from .teachers import check_teacher_width, resolve_teacher, teacher_identity
from .workdir import Workdir, check_output_path

log = logging.getLogger("d3m-build")


@dataclass(frozen=True)
class BuildContext:
    """What every class of one build shares: prepared, and checked, once before the first class."""

    source: object  # an ImageFolderSource or MnistSource
    settings: BuildSettings  # every model-dependent default resolved
    generator: GeneratorInfo
    pipe: object  # the shared StableDiffusionPipeline
    teacher: torch.nn.Module
    device: str
    record: dict  # what binds the work directory: settings, classes, source, generator, teacher


def build_archive(source, settings: BuildSettings, out: Path, *, labels: LabelEncoding, workdir: Path | None = None,
                  run: RunOptions = RunOptions(), teacher_accuracy: float | None = None) -> BuildResult:
    """Build ``source`` into the archive ``out`` (or, for a shard ``(i, n)`` with n > 1, into ``workdir`` only).

    Args:
        settings: the archive's content; ``None`` fields take the model's defaults.
        labels: how the soft labels are stored (:func:`builder.assemble.label_encoding`).
        workdir: checkpoints, default ``OUT.work`` next to the archive; rerun to resume.
        run: device, shard and the two guards (builder/guards.py).
        teacher_accuracy: the teacher's held-out accuracy to record, if known.
    """
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else out.with_name(out.name + ".work")
    start = time.perf_counter()
    wd = build_classes(prepare(source, settings, run, out, labels), workdir, run)
    seconds = time.perf_counter() - start
    if run.shard[1] > 1:
        return BuildResult(None, None, [
            f"shard {run.shard[0]}/{run.shard[1]} done in {seconds:.0f}s; when every shard is done: "
            f"d3m-build merge {workdir} -o {out}{merge_flags(labels, run.min_agreement)}"])
    # the build enforced --min-agreement on every class already
    archive = write_archive([wd.path], out, labels, out.name.removesuffix(".d3m"), teacher_accuracy)
    return BuildResult(out, archive, summarize_build([wd.path], out, archive, seconds))


def build(source, settings: BuildSettings, workdir: Path, *, run: RunOptions = RunOptions(),
          out: Path | None = None) -> Workdir:
    """Build this shard's classes into ``workdir`` (skipping finished ones); write no archive.

    Args:
        out: the archive this build will be written to, if known: checked for writability now,
            so a bad ``-o`` fails before any class is built; the class-order check writes its
            suggested class list beside it.
    """
    return build_classes(prepare(source, settings, run, out), Path(workdir), run)


def check_inputs(source, settings: BuildSettings, run: RunOptions, out: Path | None,
                 labels: LabelEncoding | None) -> str:
    """Every value, then the device, the output folder and the data, before any model loads; returns the device."""
    check_settings(settings, run)
    if labels is not None:
        check_labels(labels, len(source.classes), settings.temperature)
    device = run.device or shard_device()
    check_device(device)
    if out is not None:
        check_output_path(out)
    source.check(settings.patches.max_images)
    return device


def prepare(source, settings: BuildSettings, run: RunOptions, out: Path | None = None,
            labels: LabelEncoding | None = None) -> BuildContext:
    """Check the inputs, load the model and teacher, run the class-order guard: the build's shared context."""
    # 1. every value and input, before any work
    device = check_inputs(source, settings, run, out, labels)
    classes = source.classes
    # 2. the model, its defaults, the generator section the archive will hold
    path = resolve_model(settings.model, settings.revision)
    pipe = shared_pipeline(path, model_identity(path), device, default_dtype(device))
    settings = resolve_settings(settings, native_resolution(pipe))
    gen = generator_info(settings, pipe, path)
    # 3. the teacher: one logit per class, in the data's class order (every shard checks all classes alike)
    teacher, teacher_name = resolve_teacher(settings.teacher)
    teacher = teacher.to(device)
    patch_side = gen.height // settings.grid
    check_teacher_width(teacher, len(classes), patch_side, device)
    if run.check_order:
        suggestion = None if out is None else Path(out).with_suffix(".classes.txt")
        order = check_class_order(teacher_confusion(source, teacher, patch_side, device), classes, suggestion)
        for c in np.flatnonzero(order.agreement < LOW_AGREEMENT_FLOOR):
            log.warning("class %s: the teacher takes only %.0f%% of its real images for this class; is the teacher "
                        "trained on this data, in this class order?", printable(classes[c].name), 100 * order.agreement[c])
    # 4. the record that binds the work directory; the archive it will make must be valid
    record = {
        "settings": settings.to_json(),
        "classes": [asdict(c) for c in classes],
        "source": asdict(source.info()),
        "generator": generator_to_dict(gen),
        "teacher": {"name": teacher_name, "identity": teacher_identity(teacher)},
    }
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    Manifest.from_json(archive_manifest(record, LabelEncoding(), "preflight", settings.inversion.n_vectors, dim).to_json())
    return BuildContext(source, settings, gen, pipe, teacher, device, record)


def generator_info(s: BuildSettings, pipe, path: Path) -> GeneratorInfo:
    """The archive's generator section for these (resolved) settings and this model."""
    from diffusers import DDIMScheduler

    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    side = s.resolution
    if side % s.grid or side % factor or side % s.fingerprint_size:
        raise D3MError(f"--resolution {side} must be divisible by --grid {s.grid}, the VAE factor {factor} "
                       f"and the fingerprint size {s.fingerprint_size}")
    config = {k: v for k, v in DDIMScheduler.from_config(pipe.scheduler.config).config.items() if not k.startswith("_")}
    return GeneratorInfo(
        model=ModelRef(s.model, s.revision, model_identity(path)),
        scheduler="DDIMScheduler",
        scheduler_config=json.loads(json.dumps(config)),
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        height=side,
        width=side,
        latent_shape=(pipe.unet.config.in_channels, side // factor, side // factor),
        prompt_template=s.prompt_template,
        negative_prompt=s.negative_prompt,
        dtype=default_dtype(str(pipe.device)),
    )


def native_resolution(pipe) -> int:
    """The model's own image side: UNet sample size x VAE downsampling factor."""
    return pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def build_classes(ctx: BuildContext, workdir: Path, run: RunOptions) -> Workdir:
    """Bind ``workdir`` to this build, then build this shard's unfinished classes into it."""
    from tqdm.auto import tqdm

    wd = Workdir(workdir)
    wd.bind(ctx.record)
    classes = ctx.source.classes
    mine = shard_classes(len(classes), run.shard)
    todo = [c for c in mine if not wd.done(c)]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d classes already done in %s", len(mine) - len(todo), len(mine), wd.path)
        if run.min_agreement is not None:  # a rerun must not skip a class that failed before
            resumed = [c for c in mine if c not in todo]
            enforce_min_agreement([classes[c].name for c in resumed], [wd.load_class(c)[1] for c in resumed],
                                  run.min_agreement, wd.path)
    for c in tqdm(todo, desc="classes", unit="class", disable=not run.progress):
        tensors, meta = build_class(ctx, c)
        wd.save_class(c, tensors, meta)
        if domain_problems([meta["real_agreement"]], [meta["regenerated"]]):
            log.warning(printable(domain_message(classes[c].name, meta["real_agreement"], meta["regenerated"])))
        enforce_min_agreement([classes[c].name], [meta], run.min_agreement, wd.path)
    return wd


def build_class(ctx: BuildContext, c: int) -> tuple[dict, dict]:
    """Steps 1-6 for class ``c``; returns (tensors, metadata) for its checkpoint."""
    s, gen, teacher, device = ctx.settings, ctx.generator, ctx.teacher, ctx.device
    info = ctx.source.classes[c]
    g, val_g = class_generator(s.seed, c, 1), class_generator(s.seed, c, 2)
    patch_side = gen.height // s.grid
    name = printable(info.name)  # for logs: a folder name may hold terminal escapes
    times = {}
    # 1-2. real images (loaded at twice the patch side, so crops keep detail) -> most informative patches
    t0 = time.perf_counter()
    images = ctx.source.images(c, side=2 * patch_side, limit=s.patches.max_images)
    keep = s.ipc * s.grid * s.grid
    patches, losses = select_patches(images, c, teacher, keep, patch_side, s.patches, g, device)
    if len(images) < keep:
        log.warning("class %s: %d real images for %d patches; best crops are reused", name, len(images), keep)
    # 3. collages
    collages = make_collages(patches, s.grid)
    with torch.no_grad():
        real_agreement = float((teacher(patches.to(device)).argmax(1).cpu() == c).float().mean())
    times["select"] = time.perf_counter() - t0
    # 4. textual inversion
    t0 = time.perf_counter()
    vectors, _, inversion = invert_class_token(ctx.pipe, collages, info.name, gen.prompt_template, gen.placeholder,
                                               s.inversion, g, val_g)
    times["invert"] = time.perf_counter() - t0
    # 5-6. seeds, regeneration through d3mfmt, soft labels, fingerprints
    t0 = time.perf_counter()
    # the archive stores fp16 vectors: label exactly what a consumer will render from them
    vectors = vectors.astype(np.float16).astype(np.float32)
    regen = Regenerator(gen, vectors[None], RenderOptions(device=device, dtype=gen.dtype))
    candidates = class_seeds(s.seed, c, s.ipc * s.seed_candidates)
    seeds = choose_seeds(regen, 0, c, candidates, s.ipc, teacher, s.grid, device)
    probs, prints, _ = render_and_label(regen, 0, seeds, teacher, s.grid, s.temperature, s.fingerprint_size, device)
    times["label"] = time.perf_counter() - t0
    regenerated = float((probs.argmax(axis=1) == c).mean())
    log.info("class %s: patch loss %.3f, teacher agrees on %.0f%% of regenerated patches (%.0f%% of real ones)",
             name, float(losses.mean()), 100 * regenerated, 100 * real_agreement)
    tensors = {"embedding": vectors, "seeds": np.asarray(seeds, dtype=np.int64), "probs": probs.astype(np.float32),
               "fingerprints": prints}
    meta = {"regenerated": regenerated, "real_agreement": real_agreement, "inversion": inversion, "seconds": times}
    return tensors, meta
