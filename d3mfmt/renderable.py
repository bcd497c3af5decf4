"""What a reader checks so that a valid archive also renders: image geometry and render cost.

spec/SPEC.md ("Image geometry", "Render cost") is the authority. Geometry is a
format rule (``Manifest.check`` applies it, so the writer refuses it too): the
pipeline's multiple-of-8 sides, one power-of-two VAE factor between the image
and its latents, and, for a built-in model, its own latent channels, VAE factor
and text width. Render cost is the reader's bound on what an archive may ask of
a consumer; ``check_render_cost`` applies ``RenderLimits`` (defaults below, a
built-in model's from its own size) and names the override in every refusal.

Example:
    >>> import d3mfmt
    >>> archive = d3mfmt.load_file("spec/vectors/topk.d3m")               # doctest: +SKIP
    >>> render_cost(archive.manifest.generator, archive.manifest.dataset.num_images)  # doctest: +SKIP
    RenderCost(evaluations=40, latent_pixels=256, per_image=10240, total=61440)
    >>> trusted = RenderLimits(per_image=None, total=None)                 # no bound on those two
    >>> d3mfmt.load_file("big.d3m", render_limits=trusted)                 # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, fields

from .errors import D3MFormatError
from .models import BUILTIN_MODELS, WEIGHTS_DIR
from .schedulers import unet_evaluations

PIPELINE_MULTIPLE = 8  # StableDiffusionPipeline refuses other heights and widths
VAE_FACTORS = (1, 2, 4, 8, 16, 32, 64)  # 2 ** (VAE blocks - 1); SD uses 8, d3m/tiny-mnist 4
MAX_LATENT_CHANNELS = 16
SD_SAMPLE_SIZE = 64  # SD 1.x UNet latent side (512 px): the reference for the default limits


@dataclass(frozen=True)
class RenderLimits:
    """What one archive may ask a consumer to compute (SPEC.md "Render cost"); ``None`` lifts a bound.

    Attributes:
        evaluations: UNet evaluations per image, both guidance branches counted.
        latent_pixels: latent height x width per image.
        per_image: evaluations x latent pixels per image.
        total: per-image cost x images in the archive.

    The defaults are ``RenderLimits.for_model(64)``: SD 1.x (64 x 64 latents)
    admits 512 px at 100 steps with guidance (409,600 / 819,200 per image), SD 2.x
    768 px at 100 Heun steps with guidance (3,667,968), and ImageNet-1k at IPC 50
    at 512 px and 100 steps; it refuses 1024 px at 1,000 steps (32,768,000).
    """

    evaluations: int | None = 400
    latent_pixels: int | None = 4 * SD_SAMPLE_SIZE**2
    per_image: int | None = 1024 * SD_SAMPLE_SIZE**2
    total: int | None = (1 << 24) * SD_SAMPLE_SIZE**2

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise D3MFormatError(f"RenderLimits.{f.name} must be a positive integer or None, got {value!r}")

    @classmethod
    def for_model(cls, sample_size: int) -> "RenderLimits":
        """The limits for a UNet trained on ``sample_size``-square latents: sides up to 2x its own,
        1,024 full-size evaluations per image, 2^24 of them per archive."""
        native = sample_size * sample_size
        return cls(evaluations=400, latent_pixels=4 * native, per_image=1024 * native, total=(1 << 24) * native)


DEFAULT_RENDER_LIMITS = RenderLimits()


@dataclass(frozen=True)
class RenderCost:
    """What rendering an archive costs, in the units of ``RenderLimits``."""

    evaluations: int
    latent_pixels: int
    per_image: int
    total: int


def render_cost(generator, num_images: int) -> RenderCost:
    """The cost of rendering ``num_images`` images with ``generator`` (a ``GeneratorInfo``)."""
    branches = 2 if generator.guidance_scale > 1 else 1  # classifier-free guidance runs the UNet twice
    evaluations = branches * unet_evaluations(generator.scheduler, generator.scheduler_config, generator.steps)
    latent_pixels = generator.latent_shape[1] * generator.latent_shape[2]
    per_image = evaluations * latent_pixels
    return RenderCost(evaluations, latent_pixels, per_image, per_image * num_images)


UNBOUNDED = RenderLimits(evaluations=None, latent_pixels=None, per_image=None, total=None)  # a trusted archive


def limits_for(generator) -> RenderLimits:
    """The default limits for ``generator``'s model: a built-in's own, else ``DEFAULT_RENDER_LIMITS``."""
    geometry = builtin_geometry(generator.model.id)
    return DEFAULT_RENDER_LIMITS if geometry is None else RenderLimits.for_model(geometry.sample_size)


def check_render_cost(manifest, limits: RenderLimits | None = None) -> None:
    """Raise D3MFormatError if rendering ``manifest``'s archive asks more than ``limits`` (default: ``limits_for``)."""
    check_cost(manifest.generator, manifest.dataset.num_images, limits)


OVERRIDE_HINT = ("if you trust this archive, lift or raise that bound: render_limits=RenderLimits({name}=...) for "
                 "d3mfmt.load_file, render=RenderOptions(limits=RenderLimits({name}=...)) for D3MDataset "
                 "(None lifts a bound), --trust-render-cost for d3m-inspect")


def check_cost(generator, num_images: int, limits: RenderLimits | None = None, *, limit_of: str = "the reader") -> None:
    """``check_render_cost`` for a ``GeneratorInfo`` and an image count.

    A renderer that has loaded its model SHOULD also call it with
    ``RenderLimits.for_model(unet.config.sample_size)``: that bounds an archive
    naming a copy of a small model by another path, which the reader cannot know
    (``Regenerator`` does, naming the model in ``limit_of``).
    """
    gen = generator
    limits = limits_for(gen) if limits is None else limits
    cost = render_cost(gen, num_images)
    for name, what in (("evaluations", "UNet evaluations per image"), ("latent_pixels", "latent pixels per image"),
                       ("per_image", "render cost per image (evaluations x latent pixels)"),
                       ("total", f"render cost of all {num_images} images")):
        bound, asked = getattr(limits, name), getattr(cost, name)
        if bound is not None and asked > bound:
            raise D3MFormatError(
                f"manifest.json: generator asks {asked:,} {what} ({gen.steps} steps of {gen.scheduler}, guidance "
                f"{gen.guidance_scale}, {gen.height}x{gen.width} px as {gen.latent_shape[1]}x{gen.latent_shape[2]} "
                f"latents), over {limit_of}'s limit of {bound:,}; " + OVERRIDE_HINT.format(name=name)
            )


@dataclass(frozen=True)
class ModelGeometry:
    """What a reader knows of a model without loading it: from its shipped config files."""

    latent_channels: int
    vae_factor: int
    text_width: int
    sample_size: int


@functools.lru_cache(maxsize=None)
def _builtin_geometry(folder: str) -> ModelGeometry:
    def config(part: str) -> dict:
        return json.loads((WEIGHTS_DIR / folder / part / "config.json").read_text("utf-8"))

    unet, vae = config("unet"), config("vae")
    return ModelGeometry(unet["in_channels"], 2 ** (len(vae["block_out_channels"]) - 1),
                         config("text_encoder")["hidden_size"], unet["sample_size"])


@functools.lru_cache(maxsize=256)
def _builtin_folder(model_id: str) -> str | None:
    """The built-in folder ``model_id`` names: a built-in id, or a path to a built-in's own folder."""
    if model_id in BUILTIN_MODELS:
        return BUILTIN_MODELS[model_id].folder
    if len(model_id) > 4096 or "\x00" in model_id:
        return None
    try:
        target = os.path.realpath(model_id)
    except (OSError, ValueError):
        return None
    for builtin in BUILTIN_MODELS.values():
        if target == os.path.realpath(WEIGHTS_DIR / builtin.folder):
            return builtin.folder
    return None


def builtin_geometry(model_id: str) -> ModelGeometry | None:
    """The geometry of the built-in model ``model_id`` names, None for any other model."""
    folder = _builtin_folder(model_id)
    return None if folder is None else _builtin_geometry(folder)


def check_geometry(generator, embedding_dim: int) -> None:
    """Raise D3MFormatError unless the image sizes, latent shape and embedding width can render (SPEC "Image geometry")."""
    gen = generator
    channels, lh, lw = gen.latent_shape
    # 1. the pipeline's own rule, and one VAE factor for both sides
    if gen.height % PIPELINE_MULTIPLE or gen.width % PIPELINE_MULTIPLE:
        raise D3MFormatError(f"manifest.json: generator.height/width ({gen.height}x{gen.width}) must be multiples of "
                             f"{PIPELINE_MULTIPLE} (StableDiffusionPipeline refuses other sizes)")
    factor = gen.height // lh
    if factor not in VAE_FACTORS or gen.height != factor * lh or gen.width != factor * lw:
        raise D3MFormatError(
            f"manifest.json: generator.latent_shape {list(gen.latent_shape)} does not fit {gen.height}x{gen.width} px: "
            f"height/latent height and width/latent width must be one VAE factor, a power of two in {list(VAE_FACTORS)}"
        )
    if not 1 <= channels <= MAX_LATENT_CHANNELS:
        raise D3MFormatError(f"manifest.json: generator.latent_shape[0] (latent channels) must be in "
                             f"1..{MAX_LATENT_CHANNELS}, got {channels}")
    # 2. a built-in model: its own channels, factor and text width, known without loading it
    geometry = builtin_geometry(gen.model.id)
    if geometry is None:
        return
    want = (geometry.latent_channels, geometry.vae_factor, geometry.text_width)
    if (channels, factor, embedding_dim) != want:
        raise D3MFormatError(
            f"manifest.json: built-in model {gen.model.id!r} renders {geometry.latent_channels}-channel latents at "
            f"VAE factor {geometry.vae_factor} from {geometry.text_width}-wide embeddings; the archive asks "
            f"{channels} channels, factor {factor} and embeddings.dim {embedding_dim}"
        )
