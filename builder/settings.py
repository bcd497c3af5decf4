"""A build's settings, its model-dependent defaults, and the one check of every value.

:class:`BuildSettings` holds everything that determines the archive's content
(recorded in ``manifest.build.settings``); :class:`RunOptions` how one run
goes (device, shard, guards), which does not. ``None`` in a field means "the
model's default", filled in by :func:`resolve_settings` once the model is loaded,
so the work directory and the archive record the values actually used:

- The built-in model (``d3m/tiny-mnist``): the values measured on it (README,
  "Built-in models" and "Benchmark").
- Any other model is taken to be a Stable Diffusion 1.x/2.x checkpoint:
  resolution = the UNet's native size (512 for SD 1.x, 768 for SD 2.x);
  50 DDIM steps and guidance 7.5, the defaults of diffusers'
  ``StableDiffusionPipeline``; D3M's template "a photo of {token}"; and
  inversion at the effective learning rate of diffusers' textual-inversion
  README run (5e-4 scaled by batch 1 x gradient accumulation 4 = 2e-3, batch 4).
  That run trains 3,000 steps on one concept from 3-5 photos; a class here has
  IPC collages, and 1,000 classes multiply the cost, so 500 steps (2,000
  collage views per class) are the default. The kept vector is the candidate
  (initialiser, every ``render_every`` steps, the last, the lowest validation
  loss) whose renders at the archive's guidance and steps the teacher assigns
  to the class most often (builder/keepbest.py): on the built-in model a lower
  denoising loss did not mean better renders (docs/results.md, "Textual
  inversion").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from d3mfmt import D3MError
from d3mfmt.modelpin import check_variant
from d3mfmt.models import BUILTIN_MODELS
from d3mfmt.render import DTYPE_NAMES
from d3mfmt.renderable import RenderLimits

from .inversion import NORM_CONTROL, TIMESTEP_SAMPLING, InversionSettings
from .patches import PatchSettings

DEMO_MODEL, DEMO_TEACHER = "d3m/tiny-mnist", "mnist-cnn"


@dataclass(frozen=True)
class BuildSettings:
    """Everything that determines the archive's content (recorded in manifest.build.settings).

    ``model`` and ``teacher`` have no default: a build names both (:func:`demo_settings`
    gives the built-in pair). ``None`` means "the model's default" (:func:`resolve_settings`).
    """

    model: str  # built-in id, diffusers folder or hub id (local cache)
    teacher: str  # built-in teacher name or module:function
    revision: str | None = None
    variant: str | None = None  # weight files ("fp16"...); None: the plain ones, or the only variant there
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


@dataclass(frozen=True)
class RunOptions:
    """How one run goes; none of it changes the archive's content.

    Args:
        shard: ``(i, n)``: build only the classes ``c`` with ``c % n == i`` (n > 1: no archive yet).
        device: ``None``: cuda:LOCAL_RANK under a launcher with GPUs, else the default device.
        dtype: the frozen model's dtype for inversion and rendering (``None``: fp16 on CUDA, fp32
            elsewhere); recorded as ``generator.dtype``, the dtype the labels were computed in.
        check_order: stop if the teacher's logits are in another class order than the data (guards.py).
        min_agreement: no archive when a class's teacher agreement on regenerated patches is below
            this fraction (checked once, when the archive is written; a shard records and reports
            its classes below it and goes on); ``None``: only warn.
        progress: show a progress bar over the classes.
        render_limits: the render cost the build accepts (``d3mfmt.RenderLimits``). ``None``: a default
            reader's, so the archive renders for anyone; lifted (``--trust-render-cost``), settings
            over them are built with a warning, and the archive's readers need the same trust.
    """

    shard: tuple[int, int] = (0, 1)
    device: str | None = None
    dtype: str | None = None
    check_order: bool = True
    min_agreement: float | None = None
    progress: bool = True
    render_limits: RenderLimits | None = None


def demo_settings(**overrides) -> BuildSettings:
    """The built-in demo: the tiny MNIST model and the MNIST teacher, with the model's defaults."""
    return BuildSettings(model=DEMO_MODEL, teacher=DEMO_TEACHER, **overrides)


def check_min_agreement(value: float | None) -> None:
    """``--min-agreement`` is a fraction (or absent)."""
    if value is not None and not 0 <= value <= 1:
        raise D3MError(f"--min-agreement must be a fraction in 0..1 (e.g. 0.5), got {value}")


def check_settings(s: BuildSettings, run: RunOptions = RunOptions()) -> None:
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
         f"--guidance-scale must be >= 1 (1 = no classifier-free guidance), got {s.guidance_scale}"),
        (s.prompt_template is None or s.prompt_template.count("{token}") == 1,
         f"--prompt-template must contain '{{token}}' exactly once, got {s.prompt_template!r}"),
        (0 <= s.seed < 2**63, f"--seed must be in 0..2^63-1, got {s.seed}"),
        positive(s.seed_candidates, "--seed-candidates"),
        finite_positive(s.temperature, "--temperature"),
        positive(s.fingerprint_size, "fingerprint_size"),
        positive(inv.steps, "--ti-steps", 0),
        finite_positive(inv.lr, "--ti-lr"),
        positive(inv.batch, "--ti-batch"),
        (1 <= inv.n_vectors <= 16, f"--n-vectors must be in 1..16, got {inv.n_vectors}"),
        positive(inv.val_size, "inversion val_size"),
        positive(inv.val_every, "inversion val_every"),
        positive(inv.render_every, "inversion render_every", 0),
        positive(inv.render_images, "inversion render_images"),
        (inv.norm in NORM_CONTROL, f"inversion norm must be one of {', '.join(NORM_CONTROL)}, got {inv.norm!r}"),
        (math.isfinite(inv.norm_pull) and inv.norm_pull >= 0, f"inversion norm_pull must be >= 0, got {inv.norm_pull}"),
        (inv.timesteps in TIMESTEP_SAMPLING,
         f"inversion timesteps must be one of {', '.join(TIMESTEP_SAMPLING)}, got {inv.timesteps!r}"),
        positive(pat.n_crops, "--n-crops"),
        positive(pat.max_images, "--max-images"),
        (0 <= run.shard[0] < run.shard[1], f"--shard {run.shard[0]}/{run.shard[1]}: need 0 <= i < n"),
        (run.dtype is None or run.dtype in DTYPE_NAMES, f"--dtype must be one of {', '.join(DTYPE_NAMES)}, "
                                                         f"got {run.dtype!r}"),
        (run.render_limits is None or isinstance(run.render_limits, RenderLimits),
         f"RunOptions.render_limits must be a d3mfmt.RenderLimits or None, got {run.render_limits!r}"[:300]),
    ]
    for ok, message in checks:
        if not ok:
            raise D3MError(message)
    check_min_agreement(run.min_agreement)
    try:
        check_variant(s.variant)
    except D3MError:
        raise D3MError(f"--variant must be a weight-file variant name such as fp16 (letters, digits, '_', '-'), "
                       f"got {s.variant!r}"[:300]) from None


@dataclass(frozen=True)
class ModelDefaults:
    """Defaults for one model (``resolution=None``: the model's native collage side)."""

    resolution: int | None
    steps: int
    guidance_scale: float
    prompt_template: str  # grid 1 (one patch per image)
    collage_template: str  # grid > 1
    ti_steps: int
    ti_lr: float
    ti_batch: int


STABLE_DIFFUSION = ModelDefaults(
    resolution=None, steps=50, guidance_scale=7.5, prompt_template="a photo of {token}",
    collage_template="a photo of {token}", ti_steps=500, ti_lr=2e-3, ti_batch=4,
)

# Measured on the built-in model: 100 steps at lr 2e-3 and batch 16. From a token the
# model never saw in a caption ("7") lr 5e-4 moves too little in 100 steps (the
# 64-wide embedding's coordinates are ~0.02); 2e-3 reaches the class word's renders.
# Render-scored keep-best (builder/keepbest.py) keeps a class word whose learned
# vector renders worse (README "Textual inversion").
_BUILTIN_INVERSION = {"d3m/tiny-mnist": dict(ti_steps=100, ti_lr=2e-3, ti_batch=16)}


def model_defaults(model_id: str, grid: int = 2) -> ModelDefaults:
    """The defaults for ``model_id``: a built-in's measured values, else Stable Diffusion's."""
    builtin = BUILTIN_MODELS.get(model_id)
    if builtin is None:
        return STABLE_DIFFUSION
    return ModelDefaults(
        resolution=builtin.collage_resolution if grid > 1 else builtin.resolution,
        steps=builtin.steps,
        guidance_scale=builtin.guidance_scale,
        prompt_template=builtin.photo_template.replace("{}", "{token}"),
        collage_template=builtin.collage_template.replace("{}", "{token}"),
        **_BUILTIN_INVERSION[model_id],
    )


def resolve_settings(s: BuildSettings, native_resolution: int) -> BuildSettings:
    """``s`` with every model-dependent ``None`` replaced by the model's default.

    Args:
        native_resolution: the model's own image side (UNet sample size x VAE factor).
    """
    d = model_defaults(s.model, s.grid)
    inv = s.inversion

    def given(value, default):
        return default if value is None else value

    return replace(
        s,
        resolution=given(s.resolution, d.resolution or native_resolution),
        steps=given(s.steps, d.steps),
        guidance_scale=given(s.guidance_scale, d.guidance_scale),
        prompt_template=given(s.prompt_template, d.collage_template if s.grid > 1 else d.prompt_template),
        inversion=replace(inv, steps=given(inv.steps, d.ti_steps), lr=given(inv.lr, d.ti_lr),
                          batch=given(inv.batch, d.ti_batch)),
    )


def describe(field_name: str) -> str:
    """'built-in: X; Stable Diffusion: Y' for a model-dependent field (CLI help)."""
    tiny, sd = model_defaults(DEMO_MODEL), STABLE_DIFFUSION
    if field_name == "resolution":
        return f"built-in: {tiny.resolution} (2x2 collage); Stable Diffusion: the UNet's native size"
    return f"built-in: {getattr(tiny, field_name)}; Stable Diffusion: {getattr(sd, field_name)}"
