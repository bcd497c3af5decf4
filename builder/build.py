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

When every class is done the archive is written through d3mfmt's writer
(temporary file, then rename). ``merge`` writes the same archive from the
work directories of several shards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

import d3mfmt
from d3mfmt import (
    ClassInfo,
    D3MError,
    DatasetInfo,
    EmbeddingInfo,
    GeneratorInfo,
    LabelEncoding,
    Manifest,
    ModelRef,
    RenderOptions,
    SourceInfo,
    TeacherInfo,
)
from d3mfmt.agreement import LOW_AGREEMENT_FLOOR
from d3mfmt.generator import Regenerator, check_device, default_device, default_dtype, shared_pipeline
from d3mfmt.manifest import generator_from_dict, generator_to_dict
from d3mfmt.models import model_identity, resolve_model
from d3mfmt.terminal import printable

from .defaults import resolve_settings
from .guards import check_class_order, domain_message, domain_problems, teacher_confusion
from .inversion import TIMESTEP_SAMPLING, InversionSettings, invert_class_token
from .labelling import choose_seeds, class_seeds, render_and_label
from .patches import PatchSettings, make_collages, select_patches
from .teacher_spec import check_teacher_width, resolve_teacher, teacher_identity
from .workdir import REBUILD_CLASS, SETTINGS_FILE, Workdir, check_output_path

log = logging.getLogger("d3m-build")


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines the archive's content (recorded in manifest.build.settings).

    ``model`` and ``teacher`` have no default: a build names both (:func:`demo_settings`
    gives the built-in pair). ``None`` means "the model's default" (builder/defaults.py);
    :func:`~builder.defaults.resolve_settings` fills those in before the build.
    """

    model: str  # built-in id, diffusers folder or hub id (local cache)
    teacher: str  # built-in teacher name or module:function
    revision: str | None = None
    ipc: int = 10
    grid: int = 2
    resolution: int | None = None  # collage side in pixels
    steps: int | None = None  # DDIM steps
    guidance_scale: float | None = None
    prompt_template: str | None = None  # with "{token}"
    negative_prompt: str = ""
    seed: int = 0
    seed_candidates: int = 1  # M: render M candidates per kept image
    temperature: float = 1.0
    fingerprint_size: int = 4
    patches: PatchSettings = field(default_factory=PatchSettings)
    inversion: InversionSettings = field(default_factory=InversionSettings)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


DEMO_MODEL, DEMO_TEACHER = "d3m/tiny-mnist", "mnist-cnn"


def demo_settings(**overrides) -> BuildSettings:
    """The built-in demo: the tiny MNIST model and the MNIST teacher, with the model's defaults."""
    return BuildSettings(model=DEMO_MODEL, teacher=DEMO_TEACHER, **overrides)


def check_settings(s: BuildSettings) -> None:
    """One clear error per bad value, before any work. ``None`` (the model's default) is always fine."""

    def positive(value, option, lo=1):
        return value is None or (not isinstance(value, bool) and value >= lo), \
            f"{option} must be >= {lo}, got {value}"

    def finite_positive(value, option):
        return value is None or (math.isfinite(value) and value > 0), f"{option} must be a positive number, got {value}"

    inv, pat = s.inversion, s.patches
    checks = [
        (isinstance(s.model, str) and s.model != "", "--model must name a model (built-in id, folder or hub id)"),
        (isinstance(s.teacher, str) and s.teacher != "", "--teacher must name a teacher (built-in or module:function)"),
        positive(s.ipc, "--ipc"),
        (1 <= s.grid <= 8, f"--grid must be in 1..8, got {s.grid}"),
        positive(s.resolution, "--resolution", 8),
        positive(s.steps, "--steps"),
        (s.guidance_scale is None or (math.isfinite(s.guidance_scale) and s.guidance_scale >= 1),
         f"--guidance must be >= 1 (1 = no classifier-free guidance), got {s.guidance_scale}"),
        (s.prompt_template is None or s.prompt_template.count("{token}") == 1,
         f"--template must contain '{{token}}' exactly once, got {s.prompt_template!r}"),
        (0 <= s.seed < 2**63, f"--seed must be in 0..2^63-1, got {s.seed}"),
        positive(s.seed_candidates, "--seed-candidates"),
        finite_positive(s.temperature, "--temperature"),
        positive(s.fingerprint_size, "fingerprint_size"),
        positive(inv.steps, "--ti-steps", 0),
        finite_positive(inv.lr, "--ti-lr"),
        positive(inv.batch, "--ti-batch"),
        (1 <= inv.n_vectors <= 16, f"--vectors must be in 1..16, got {inv.n_vectors}"),
        positive(inv.val_size, "inversion val_size"),
        positive(inv.val_every, "inversion val_every"),
        (inv.timesteps in TIMESTEP_SAMPLING,
         f"inversion timesteps must be one of {', '.join(TIMESTEP_SAMPLING)}, got {inv.timesteps!r}"),
        positive(pat.n_crops, "--n-crops"),
        positive(pat.max_images, "--max-images"),
    ]
    for ok, message in checks:
        if not ok:
            raise D3MError(message)


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


def parse_shard(text: str, env=os.environ) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; ``"auto"`` reads the launcher's environment.

    ``auto`` understands torchrun and accelerate (RANK, WORLD_SIZE) and Slurm
    (SLURM_PROCID, SLURM_NTASKS; or SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT).
    """
    if text == "auto":
        for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                           ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank in env and size in env:
                text = f"{env[rank]}/{env[size]}"
                break
        else:
            return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise D3MError(f"--shard must look like i/n (e.g. 0/4) or be 'auto', got {text!r}") from None
    if not 0 <= i < n:
        raise D3MError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_device(env=os.environ) -> str:
    """cuda:LOCAL_RANK under a launcher with GPUs, else the default device."""
    if torch.cuda.is_available() and "LOCAL_RANK" in env:
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return default_device()


def build_class(c: int, info: ClassInfo, source, teacher, pipe, gen: GeneratorInfo, s: BuildSettings,
                device: str) -> tuple[dict, dict]:
    """Steps 1-6 for one class; returns (tensors, metadata) for its checkpoint."""
    g = torch.Generator().manual_seed(int(np.random.default_rng([s.seed, c, 1]).integers(2**62)))
    val_g = torch.Generator().manual_seed(int(np.random.default_rng([s.seed, c, 2]).integers(2**62)))
    patch_side = gen.height // s.grid
    name = printable(info.name)  # for logs: a folder name may hold terminal escapes
    times = {}
    # 1-2. real images (loaded at twice the patch side, so crops keep detail) -> most informative patches
    t0 = time.perf_counter()
    images = source.images(c, side=2 * patch_side, limit=s.patches.max_images)
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
    vectors, curve, inversion = invert_class_token(pipe, collages, info.name, gen.prompt_template, gen.placeholder,
                                                   s.inversion, g, val_g,
                                                   log=lambda m: log.info("class %s: %s", name, m))
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
    accuracy = float((probs.argmax(axis=1) == c).mean())
    log.info("class %s: patch loss %.3f, teacher agrees on %.0f%% of regenerated patches (%.0f%% of real ones)",
             name, float(losses.mean()), 100 * accuracy, 100 * real_agreement)
    tensors = {
        "embedding": vectors,
        "seeds": np.asarray(seeds, dtype=np.int64),
        "probs": probs.astype(np.float32),
        "fingerprints": prints,
    }
    meta = {"accuracy": accuracy, "real_agreement": real_agreement, "ti_loss": curve, "inversion": inversion,
            "seconds": times, "patch_loss": float(losses.mean())}
    return tensors, meta


def build(source, settings: BuildSettings, workdir: Path, *, shard: tuple[int, int] = (0, 1),
          device: str | None = None, progress: bool = True, out: Path | None = None, check_order: bool = True,
          order_suggestion: Path | None = None, min_agreement: float | None = None) -> Workdir:
    """Build this shard's classes into ``workdir`` (skipping finished ones).

    Args:
        source: an ImageFolderSource or MnistSource.
        settings: the build's settings; ``None`` fields take the model's defaults.
        workdir: per-class checkpoints (resume by running again with the same settings).
        shard: ``(i, n)``: build the classes ``c`` with ``c % n == i``.
        out: the archive the build will be written to, if known: checked for writability now,
            so a bad ``-o`` fails before any class is built.
        check_order: stop if the teacher's logits are in another class order than the data (see guards.py).
        order_suggestion: where the class-order check writes the class list that fixes the order.
        min_agreement: stop when a class's teacher agreement on regenerated patches is below this.
    """
    from tqdm.auto import tqdm

    # 1. check every value, then the inputs (data, model, teacher), before any work
    check_settings(settings)
    check_min_agreement(min_agreement)
    device = device or shard_device()
    check_device(device)
    if out is not None:
        check_output_path(out)
    source.check(settings.patches.max_images)
    classes = source.classes
    path = resolve_model(settings.model, settings.revision)
    identity = model_identity(path)
    pipe = shared_pipeline(path, identity, device, default_dtype(device))
    settings = resolve_settings(settings, native_resolution(pipe))
    gen = generator_info(settings, pipe, path)
    teacher, teacher_name = resolve_teacher(settings.teacher)
    teacher = teacher.to(device)
    patch_side = gen.height // settings.grid
    check_teacher_width(teacher, len(classes), patch_side, device)
    # 2. the teacher's logits must be in the data's class order (every shard checks all classes alike)
    if check_order:
        order = check_class_order(teacher_confusion(source, teacher, patch_side, device), classes, order_suggestion)
        for c in np.flatnonzero(order.agreement < LOW_AGREEMENT_FLOOR):
            log.warning("class %s: the teacher takes only %.0f%% of its real images for this class; is the teacher "
                        "trained on this data, in this class order?", printable(classes[c].name), 100 * order.agreement[c])
    # 3. bind the work directory to exactly this build; check the archive it will make is valid
    record = {
        "settings": settings.to_json(),
        "classes": [asdict(c) for c in classes],
        "source": asdict(source.info()),
        "generator": generator_to_dict(gen),
        "teacher": {"name": teacher_name, "identity": teacher_identity(teacher)},
    }
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    Manifest.from_json(archive_manifest(record, LabelEncoding(), "preflight", settings.inversion.n_vectors, dim).to_json())
    wd = Workdir(workdir)
    wd.bind(record)
    # 4. this shard's unfinished classes; the domain guard speaks after each
    mine = [c for c in range(len(classes)) if c % shard[1] == shard[0]]
    todo = [c for c in mine if not wd.done(c)]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d classes already done in %s", len(mine) - len(todo), len(mine), wd.path)
    for c in tqdm(todo, desc="classes", unit="class", disable=not progress):
        tensors, meta = build_class(c, classes[c], source, teacher, pipe, gen, settings, device)
        wd.save_class(c, tensors, meta)
        if domain_problems([meta["real_agreement"]], [meta["accuracy"]]):
            log.warning(printable(domain_message(classes[c].name, meta["real_agreement"], meta["accuracy"])))
        _check_min_agreement_of(classes[c], meta, min_agreement, wd)
    if min_agreement is not None:  # resumed classes too: a rerun must not skip a class that failed before
        for c in mine:
            _check_min_agreement_of(classes[c], wd.load_class(c)[1], min_agreement, wd)
    return wd


def _check_min_agreement_of(info: ClassInfo, meta: dict, min_agreement: float | None, wd: Workdir) -> None:
    if min_agreement is not None and meta["accuracy"] < min_agreement:
        raise D3MError(f"{domain_message(info.name, meta.get('real_agreement'), meta['accuracy'])}. "
                       f"Stopped: below --min-agreement {min_agreement:g}; no archive was written "
                       f"(finished classes stay in {wd.path})")


def check_min_agreement(value: float | None) -> None:
    if value is not None and not 0 <= value <= 1:
        raise D3MError(f"--min-agreement must be a fraction in 0..1 (e.g. 0.5), got {value}")


def fit_labels(labels: LabelEncoding, num_classes: int, temperature: float) -> LabelEncoding:
    """The requested encoding for ``num_classes`` (top-k capped at C), checked; raises D3MError."""
    if labels.kind == "topk" and isinstance(labels.k, int) and labels.k > num_classes:
        labels = replace(labels, k=num_classes)
    labels = replace(labels, temperature=float(temperature))
    labels.check(num_classes)
    return labels


def archive_manifest(record: dict, labels: LabelEncoding, name: str, n_vectors: int, dim: int,
                     teacher_accuracy: float | None = None, build_info: dict | None = None) -> Manifest:
    """The manifest a work directory's record turns into (members are filled in by the writer)."""
    s = record["settings"]
    classes = tuple(ClassInfo(**c) for c in record["classes"])
    return Manifest(
        dataset=DatasetInfo(name, classes, int(s["ipc"]), int(s["grid"]), SourceInfo(**record["source"])),
        generator=generator_from_dict(record["generator"]),
        embeddings=EmbeddingInfo(n_vectors, dim, "float16"),
        labels=fit_labels(labels, len(classes), s["temperature"]),
        teacher=TeacherInfo(record["teacher"]["name"], record["teacher"]["identity"], teacher_accuracy),
        fingerprint_size=int(s["fingerprint_size"]),
        build={"tool": f"d3mfmt {d3mfmt.__version__}", "settings": s, **(build_info or {})},
    )


def write_archive(workdirs: list[Path], out: Path, labels: LabelEncoding, name: str,
                  teacher_accuracy: float | None = None, min_agreement: float | None = None) -> d3mfmt.Archive:
    """Join finished class checkpoints (from one or several shards) into ``out``.

    Raises D3MError (and writes nothing) if a class is missing, or if ``min_agreement``
    is given and a class's teacher agreement on regenerated patches is below it.
    """
    check_min_agreement(min_agreement)
    check_output_path(out)
    wds = [Workdir(p, create=False) for p in workdirs]
    record = wds[0].record()
    for wd in wds[1:]:
        if wd.record() != record:
            raise D3MError(f"{wd.path} was built with other settings than {wds[0].path}; only shards of one build merge")
    num_classes = len(record["classes"])
    found: dict[int, Workdir] = {}
    for wd in wds:
        for c in range(num_classes):
            if wd.done(c):
                found.setdefault(c, wd)
    missing = [c for c in range(num_classes) if c not in found]
    if missing:
        raise D3MError(f"classes {missing[:10]}{'...' if len(missing) > 10 else ''} are not built yet; "
                       "run (or finish) the shards that own them, then merge again")
    parts = [found[c].load_class(c) for c in range(num_classes)]
    metas = [m for _, m in parts]
    if min_agreement is not None:
        below = [c for c, m in enumerate(metas) if m["accuracy"] < min_agreement]
        if below:
            names = ", ".join(f"{record['classes'][c]['name']!r} {100 * metas[c]['accuracy']:.0f}%" for c in below[:10])
            raise D3MError(f"teacher agreement on regenerated patches is below --min-agreement {min_agreement:g} for "
                           f"{len(below)} classes ({printable(names)}); the model does not render them the way the "
                           "teacher sees them. No archive was written; use a model that covers this data")
    widths = {t["embedding"].shape for t, _ in parts}
    if len(widths) > 1:
        raise D3MError(f"class checkpoints hold embeddings of shapes {sorted(widths)}; they come from different "
                       f"models: {REBUILD_CLASS}")
    emb = np.stack([t["embedding"] for t, _ in parts])
    try:
        manifest = archive_manifest(record, labels, name, emb.shape[1], emb.shape[2], teacher_accuracy,
                                    agreement_info(record["classes"], metas))
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited record: the manifest's own checks raise D3MError
        raise D3MError(f"{wds[0].path / SETTINGS_FILE} is damaged ({exc!r}); build again into a new --workdir") from None
    archive = d3mfmt.Archive(
        manifest,
        embeddings=emb.astype(np.float16),
        seeds=np.stack([t["seeds"] for t, _ in parts]),
        labels=d3mfmt.encode_labels(np.concatenate([t["probs"] for t, _ in parts]), manifest.labels),
        fingerprints=np.stack([t["fingerprints"] for t, _ in parts]),
    )
    d3mfmt.save_file(archive, out)
    return archive


def agreement_info(classes: list[dict], metas: list[dict]) -> dict:
    """Build info: the teacher's top-1 agreement with each class on real and on regenerated patches."""
    per_class = {}
    for c, m in zip(classes, metas):
        entry = {"regenerated": round(float(m["accuracy"]), 4)}
        if m.get("real_agreement") is not None:  # absent in checkpoints of older builds
            entry["real"] = round(float(m["real_agreement"]), 4)
        per_class[c["id"]] = entry
    # per class: textual inversion's validation loss for the initialising word and for the vector kept
    inversion = {c["id"]: {k: round(m["inversion"][k], 6) for k in ("val_loss_init", "val_loss_best", "best_step")}
                 for c, m in zip(classes, metas) if "inversion" in m}  # absent in checkpoints of older builds
    return {
        "regenerated_patch_agreement": round(float(np.mean([m["accuracy"] for m in metas])), 6),
        "agreement": per_class,
        **({"inversion": inversion} if inversion else {}),
    }
