"""Model-dependent build defaults: the one place a default that depends on the model lives.

A :class:`~builder.build.BuildSettings` leaves these fields ``None`` ("the
model's default"); :func:`resolve_settings` fills them in before the build,
so the work directory and the archive record the values actually used.

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
  collage views per class) are the default. Validation keeps the vector with
  the lowest denoising loss on fixed held-out (collage, timestep, noise)
  triples, so the validation loss never ends above the initial word's; on the
  built-in model a lower loss did not mean better renders (README, "Textual
  inversion"), so this bounds the loss, not the archive's quality.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from d3mfmt.models import BUILTIN_MODELS


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

# Measured on the built-in model: 100 steps at lr 5e-4 and batch 16 (5e-3 pushes
# the 64-wide embedding, coordinates ~0.02, far off; README "Benchmark").
_BUILTIN_INVERSION = {"d3m/tiny-mnist": dict(ti_steps=100, ti_lr=5e-4, ti_batch=16)}


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


def resolve_settings(s, native_resolution: int):
    """``s`` with every model-dependent ``None`` replaced by the model's default.

    Args:
        s: a :class:`~builder.build.BuildSettings`.
        native_resolution: the model's own image side (UNet sample size x VAE factor).
    """
    d = model_defaults(s.model, s.grid)
    inv = s.inversion
    return replace(
        s,
        resolution=s.resolution if s.resolution is not None else (d.resolution or native_resolution),
        steps=s.steps if s.steps is not None else d.steps,
        guidance_scale=s.guidance_scale if s.guidance_scale is not None else d.guidance_scale,
        prompt_template=s.prompt_template if s.prompt_template is not None
        else (d.collage_template if s.grid > 1 else d.prompt_template),
        inversion=replace(
            inv,
            steps=inv.steps if inv.steps is not None else d.ti_steps,
            lr=inv.lr if inv.lr is not None else d.ti_lr,
            batch=inv.batch if inv.batch is not None else d.ti_batch,
        ),
    )


def describe(field: str) -> str:
    """'built-in: X; Stable Diffusion: Y' for a model-dependent field (CLI help)."""
    tiny, sd = model_defaults("d3m/tiny-mnist"), STABLE_DIFFUSION
    if field == "resolution":
        return f"built-in: {tiny.resolution} (2x2 collage); Stable Diffusion: the UNet's native size"
    return f"built-in: {getattr(tiny, field)}; Stable Diffusion: {getattr(sd, field)}"
