"""The D3M build: real images -> .d3m, one class at a time, resumable and shardable.

Per class (independent of every other class, so shards agree with a single run):

1. load the class's real images;
2. select the grid²·IPC most informative patches with the teacher;
3. tile them into IPC collages;
4. the early domain check: a few renders of the class's initialiser, labelled
   by the teacher, warn before the minutes of inversion (builder/guards.py);
5. textual inversion: learn the class token on those collages; keep the
   candidate that renders the class best (builder/keepbest.py);
6. seeds: IPC per class (optionally the best of M candidates each);
7. regenerate every image through d3mfmt's generator, split into patches,
   teacher -> soft label per patch, fingerprint per image;
8. checkpoint the class in the work directory (atomic write).

Before the first class, the model is resolved (SDXL, other pipelines and
single files refused before any data is read, builder/model.py), the teacher
loaded, and the preflight run once per build (builder/preflight.py: data
check, listing, class-order matrix). Every teacher call is checked
(builder/teachers.py, ``CheckedTeacher``): one that raises, returns another
shape or NaN/Inf logits stops the build at once, naming class and teacher,
before that class is checkpointed. When every class is done the archive is
joined, summarised and written last (builder/assemble.py); ``--min-agreement``
is enforced once, then: a class below it is recorded and reported, and the
build goes on.

Example:
    >>> from builder.pipeline import build_archive
    >>> from builder.labeloptions import label_encoding
    >>> from builder.settings import demo_settings
    >>> from builder.sources import MnistSource
    >>> result = build_archive(MnistSource("train"), demo_settings(ipc=1), Path("mnist_ipc1.d3m"),
    ...                        labels=label_encoding())                           # doctest: +SKIP
    >>> print("\\n".join(result.summary))                                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from d3mfmt import D3MError, GeneratorInfo, LabelEncoding, Manifest, RenderLimits, RenderOptions
from d3mfmt.agreement import LOW_AGREEMENT_FLOOR
from d3mfmt.devices import check_device
from d3mfmt.generator import Regenerator, default_dtype
from d3mfmt.manifest import generator_to_dict
from d3mfmt.terminal import printable

from .assemble import BuildResult, archive_manifest, below_min_agreement, class_labels, write_build
from .guards import EARLY_RENDERS, check_class_order, domain_message, domain_problems, early_domain_check
from .initialisers import initial_vectors
from .inversion import invert_class_token
from .labeloptions import check_labels, merge_flags
from .keepbest import render_scorer, scoring_seeds
from .labelling import choose_seeds, class_generator, class_seeds, render_and_label
from .model import check_build_render_cost, generator_info, load_build_model, native_resolution, warn_cpu_cost
from .patches import make_collages, select_patches
from .preflight import run_preflight
from .settings import BuildSettings, RunOptions, check_settings, resolve_settings
from .shards import shard_classes, shard_device
from .teachers import CheckedTeacher, TeacherError, check_teacher_width, resolve_teacher, teacher_identity
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
    files: list[list[str]] | None = None  # per class, the images patch selection reads (the preflight's listing)
    render_limits: RenderLimits | None = None  # RunOptions.render_limits: what the builder's own renders may cost

    def render_options(self) -> RenderOptions:
        """How the builder renders: on its device, in the generator's dtype, within the build's render limits."""
        return RenderOptions(device=self.device, dtype=self.generator.dtype, limits=self.render_limits)


def build_archive(source, settings: BuildSettings, out: Path, *, labels: LabelEncoding, workdir: Path | None = None,
                  run: RunOptions = RunOptions(), teacher_accuracy: float | None = None) -> BuildResult:
    """Build ``source`` into the archive ``out`` (or, for a shard ``(i, n)`` with n > 1, into ``workdir`` only).

    Args:
        settings: the archive's content; ``None`` fields take the model's defaults.
        labels: how the soft labels are stored (:func:`builder.labeloptions.label_encoding`).
        workdir: checkpoints, default ``OUT.work`` next to the archive; rerun to resume.
        run: device, shard and the two guards (builder/guards.py).
        teacher_accuracy: the teacher's held-out accuracy to record, if known.
    """
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else out.with_name(out.name + ".work")
    start = time.perf_counter()
    ctx = prepare(source, settings, run, workdir, out, labels)
    bound = Workdir(workdir)
    bound.bind(ctx.record)
    bound.bind_labels(labels)  # a shard's merge uses them; another run's must match
    wd = build_classes(ctx, workdir, run)
    seconds = time.perf_counter() - start
    if run.shard[1] > 1:
        mine = shard_classes(len(source.classes), run.shard)
        return BuildResult(None, None, [
            f"shard {run.shard[0]}/{run.shard[1]} done in {seconds:.0f}s; when every shard is done: "
            f"d3m-build merge {workdir} -o {out}{merge_flags(labels, run.min_agreement)}",
            *below_min_agreement([class_labels(source.classes)[c] for c in mine],
                                 [wd.load_class(c)[1] for c in mine], run.min_agreement)])
    # --min-agreement: enforced once, here, on every class (the build recorded and went on)
    return write_build([wd.path], out, labels, seconds, teacher_accuracy, min_agreement=run.min_agreement)


def build(source, settings: BuildSettings, workdir: Path, *, run: RunOptions = RunOptions(),
          out: Path | None = None) -> Workdir:
    """Build this shard's classes into ``workdir`` (skipping finished ones); write no archive.

    Args:
        out: the archive this build will be written to, if known: checked for writability now,
            so a bad ``-o`` fails before any class is built; the class-order check writes its
            suggested class list beside it.
    """
    return build_classes(prepare(source, settings, run, Path(workdir), out), Path(workdir), run)


def check_inputs(source, settings: BuildSettings, run: RunOptions, out: Path | None,
                 labels: LabelEncoding | None) -> str:
    """Every value, then the device and the output folder, before any model loads; returns the device."""
    check_settings(settings, run)
    if labels is not None:
        check_labels(labels, len(source.classes), settings.temperature)
    device = run.device or shard_device()
    check_device(device)
    if out is not None:
        check_output_path(out)
    return device


def prepare(source, settings: BuildSettings, run: RunOptions, workdir: Path, out: Path | None = None,
            labels: LabelEncoding | None = None) -> BuildContext:
    """Check the inputs, load model and teacher, run the preflight and the class-order guard: the build's context."""
    # 1. every value, then the model: SDXL, other pipelines, single files refused before any data is read
    device = check_inputs(source, settings, run, out, labels)
    classes = source.classes
    dtype = run.dtype or default_dtype(device)
    files, pipe = load_build_model(settings, device, dtype)
    settings = resolve_settings(settings, native_resolution(pipe))
    gen = generator_info(settings, pipe, files, dtype)
    check_build_render_cost(gen, len(classes) * settings.ipc, pipe, run.render_limits)
    warn_cpu_cost(pipe, gen, settings)
    # 2. the teacher: one logit per class, in the data's class order
    teacher, teacher_name = resolve_teacher(settings.teacher)
    teacher = teacher.to(device)
    patch_side = gen.height // settings.grid
    check_teacher_width(teacher, len(classes), patch_side, device)
    teacher_id = teacher_identity(teacher)
    teacher = CheckedTeacher(teacher, teacher_name, len(classes))  # every later call checked, batch by batch
    # 3. the preflight, once per build (every rank and restart reuses it): data check, listing, class order
    pre = run_preflight(source, teacher, side=patch_side, limit=settings.patches.max_images, teacher_id=teacher_id,
                        device=device, workdir=workdir, progress=run.progress)
    if run.check_order:
        suggestion = None if out is None else Path(out).with_suffix(".classes.txt")
        order = check_class_order(pre.counts, classes, suggestion)
        for c in np.flatnonzero(order.agreement < LOW_AGREEMENT_FLOOR):
            log.warning("class %s: the teacher takes only %.0f%% of its real images for this class; is the teacher "
                        "trained on this data, in this class order?", printable(classes[c].name), 100 * order.agreement[c])
    # 4. the record that binds the work directory; the archive it will make must be valid
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    record = {
        "settings": settings.to_json(),
        "classes": [asdict(c) for c in classes],
        "source": asdict(pre.source),
        "generator": generator_to_dict(gen),
        "teacher": {"name": teacher_name, "identity": teacher_id},
        "embedding_dim": int(dim),  # every checkpoint's embedding width: checked before the merge
    }
    Manifest.from_json(archive_manifest(record, LabelEncoding(), "preflight", settings.inversion.n_vectors, dim).to_json())
    return BuildContext(source, settings, gen, pipe, teacher, device, record, pre.files, run.render_limits)


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
    for c in tqdm(todo, desc="classes", unit="class", disable=not run.progress):
        try:
            tensors, meta = build_class(ctx, c)
        except TeacherError as exc:
            raise D3MError(f"class {printable(classes[c].name)!r}: {exc}; no checkpoint was written for this class "
                           f"(finished classes stay in {wd.path})") from None
        wd.save_class(c, tensors, meta)
        if domain_problems([meta["real_agreement"]], [meta["regenerated"]]):
            log.warning(printable(domain_message(classes[c].name, meta["real_agreement"], meta["regenerated"])))
        if run.min_agreement is not None and meta["regenerated"] < run.min_agreement:
            log.warning("class %s: teacher agreement on regenerated patches %.0f%% is below --min-agreement %g; "
                        "recorded, the build goes on (no archive will be written with it)",
                        printable(classes[c].name), 100 * meta["regenerated"], run.min_agreement)
    return wd


def early_check(ctx: BuildContext, c: int, name: str) -> None:
    """Warn when the teacher takes under half the patches of a few renders of the initialiser for class ``c``."""
    s = ctx.settings
    init, _ = initial_vectors(ctx.pipe, ctx.source.classes[c].name, s.inversion.n_vectors, s.inversion.generic_word)
    vectors = init.cpu().numpy().astype(np.float16).astype(np.float32)  # as the archive would store it
    regen = Regenerator(ctx.generator, vectors[None], ctx.render_options())
    agreement, top = early_domain_check(regen, c, class_seeds(s.seed, c, EARLY_RENDERS), ctx.teacher, s.grid, ctx.device)
    if agreement < LOW_AGREEMENT_FLOOR:
        log.warning("class %s: before inversion, the teacher takes %.0f%% of the patches of %d renders of the class "
                    "name for this class (most for %s); if regenerated patches stay this low the archive will train "
                    "poorly: check that the model covers this data (--min-agreement refuses such an archive)",
                    name, 100 * agreement, EARLY_RENDERS, printable(repr(ctx.source.classes[top].name)))


def build_class(ctx: BuildContext, c: int) -> tuple[dict, dict]:
    """Steps 1-7 for class ``c``; returns (tensors, metadata) for its checkpoint (step 8)."""
    s, gen, teacher, device = ctx.settings, ctx.generator, ctx.teacher, ctx.device
    info = ctx.source.classes[c]
    g, val_g = class_generator(s.seed, c, 1), class_generator(s.seed, c, 2)
    patch_side = gen.height // s.grid
    name = printable(info.name)  # for logs: a folder name may hold terminal escapes
    times = {}
    # 1-2. real images (loaded at twice the patch side, so crops keep detail) -> most informative patches
    t0 = time.perf_counter()
    images = ctx.source.image_stream(c, side=2 * patch_side, limit=s.patches.max_images,
                                     files=None if ctx.files is None else ctx.files[c])
    keep = s.ipc * s.grid * s.grid
    patches, losses = select_patches(images, c, teacher, keep, patch_side, s.patches, g, device)
    if images.count < keep:
        log.warning("class %s: %d real images for %d patches; best crops are reused", name, images.count, keep)
    # 3. collages
    collages = make_collages(patches, s.grid)
    with torch.no_grad():
        real_agreement = float((teacher(patches.to(device)).argmax(1).cpu() == c).float().mean())
    times["select"] = time.perf_counter() - t0
    # 4. a few renders of the class name first: a model that cannot draw the class warns now, not after inversion
    early_check(ctx, c, name)
    # 5. textual inversion
    t0 = time.perf_counter()
    candidates = class_seeds(s.seed, c, s.ipc * s.seed_candidates)
    scorer = None if not s.inversion.render_every else render_scorer(
        gen, teacher, c, scoring_seeds(s.seed, c, s.inversion.render_images, exclude=candidates), s.grid,
        ctx.render_options())
    vectors, _, inversion = invert_class_token(ctx.pipe, collages, info.name, gen.prompt_template, gen.placeholder,
                                               s.inversion, g, val_g, render_score=scorer)
    times["invert"] = time.perf_counter() - t0
    # 6-7. seeds, regeneration through d3mfmt, soft labels, fingerprints
    t0 = time.perf_counter()
    # the archive stores fp16 vectors: label exactly what a consumer will render from them
    vectors = vectors.astype(np.float16).astype(np.float32)
    regen = Regenerator(gen, vectors[None], ctx.render_options())
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
