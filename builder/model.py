"""The build's diffusion model: refused or resolved before any data is read, loaded once, described.

:func:`load_build_model` resolves ``--model`` (built-in id, folder or hub id,
``--revision``, ``--variant``) through d3mfmt's resolver, which refuses SDXL,
other pipelines and single-file checkpoints with the fix, then pins the files
rendering loads (``d3mfmt.modelpin``: the variant given, or the only one
present) and loads exactly those in ``--dtype``. :func:`generator_info` is the
archive's generator section: the pin as ``ModelRef(id, revision, identity,
variant)``, and the DDIM scheduler config as the pipeline really applies it
(``d3mfmt.generator.applied_scheduler_config``: a PNDM or DDIM config without
``clip_sample`` renders with ``clip_sample=False``, and the manifest says so).
"""

from __future__ import annotations

import json
import logging
import re

from d3mfmt import D3MError, GeneratorInfo, ModelRef, RenderLimits
from d3mfmt.errors import D3MModelError
from d3mfmt.cpucost import cpu_cost_message
from d3mfmt.generator import applied_scheduler_config, shared_pipeline
from d3mfmt.modelpin import ModelFiles, model_files
from d3mfmt.models import resolve_model
from d3mfmt.terminal import printable

from .settings import BuildSettings

log = logging.getLogger("d3m-build")


# d3mfmt's hints for a model missing from the cache name the library's allow_download=True, an option
# d3m-build does not have (a build never downloads): said in d3m-build's terms instead
# d3mfmt's hint names each tool's switch; d3m-build has none, so only the download command stays
_LIBRARY_HINTS = ((re.compile(r" \(d3m-build: run the command first\), or let d3mfmt fetch .*?--allow-download"), ""),)


def build_hint(message: str) -> str:
    """A model-resolution message in d3m-build's terms: the download command, no library switch."""
    for pattern, replacement in _LIBRARY_HINTS:
        message = pattern.sub(replacement, message)
    if "allow_download" in message:  # a form not known here: say what the switch means for d3m-build
        message += " (d3m-build never downloads: fetch the model first, e.g. with `hf download`)"
    return message


def load_build_model(settings: BuildSettings, device: str, dtype: str) -> tuple[ModelFiles, object]:
    """(the pinned files, the shared pipeline) of ``settings.model`` in ``dtype`` on ``device``."""
    try:
        path = resolve_model(settings.model, settings.revision, variant=settings.variant)
    except D3MModelError as exc:
        raise D3MModelError(build_hint(str(exc))) from None
    files = model_files(path, settings.variant)
    if files.variant is not None and settings.variant is None:
        log.info("model %s holds only %r weights: loading those (--variant %s)", printable(settings.model),
                 files.variant, files.variant)
    return files, shared_pipeline(path, files.identity(), device, dtype, variant=files.variant)


def generator_info(s: BuildSettings, pipe, files: ModelFiles, dtype: str) -> GeneratorInfo:
    """The archive's generator section for these (resolved) settings and this model."""
    from diffusers import DDIMScheduler

    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    side = s.resolution
    if side % s.grid or side % factor or side % s.fingerprint_size:
        raise D3MError(f"--resolution {side} must be divisible by --grid {s.grid}, the VAE factor {factor} "
                       f"and the fingerprint size {s.fingerprint_size}")
    ddim = dict(DDIMScheduler.from_config(pipe.scheduler.config).config)
    config = applied_scheduler_config(pipe, "DDIMScheduler", ddim)
    return GeneratorInfo(
        model=ModelRef(s.model, s.revision, files.identity(), files.variant),
        scheduler="DDIMScheduler",
        scheduler_config=json.loads(json.dumps(config)),
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        height=side,
        width=side,
        latent_shape=(pipe.unet.config.in_channels, side // factor, side // factor),
        prompt_template=s.prompt_template,
        negative_prompt=s.negative_prompt,
        dtype=dtype,
    )


def check_build_render_cost(gen: GeneratorInfo, num_images: int, pipe, limits: RenderLimits | None = None) -> None:
    """Refuse settings whose archive readers would refuse by default (SPEC "Render cost"), before any data is read.

    With ``limits`` (``RunOptions.render_limits``, lifted by ``--trust-render-cost``) the settings are
    checked against those before any data is read, and settings over a default reader's bounds are
    built with a warning: every reader then needs the same trust.
    """
    from d3mfmt.renderable import check_cost

    if limits is not None:  # the build's own limits bind first, tighter or looser than a default reader's
        check_cost(gen, num_images, limits, limit_of="the build's render limits")
    try:
        check_cost(gen, num_images, RenderLimits.for_model(pipe.unet.config.sample_size), limit_of="a default reader")
    except D3MError as err:
        reason = str(err).split("; if you trust", 1)[0].removeprefix("manifest.json: generator asks ")
        if limits is None:
            raise D3MError(f"these settings make an archive that readers refuse by default: it asks {reason}; "
                           "lower --steps, --resolution or --ipc (or use fewer classes), or build it anyway with "
                           "--trust-render-cost (its readers then need --trust-render-cost too)") from None
        log.warning("this archive asks %s: readers refuse it unless told to trust its render cost "
                    "(d3m-inspect --trust-render-cost, RenderOptions(limits=d3mfmt.RenderLimits(...)))", reason)


def native_resolution(pipe) -> int:
    """The model's own image side: UNet sample size x VAE downsampling factor."""
    return pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def warn_cpu_cost(pipe, gen: GeneratorInfo, s: BuildSettings) -> None:
    """Once per process, an SD-sized model on the CPU: what an image and a class's inversion cost here."""
    cost = cpu_cost_message(pipe, gen.latent_shape, gen.steps, gen.guidance_scale)
    if cost is None:
        return
    message, seconds = cost
    calls = s.inversion.steps * s.inversion.batch * 3  # forward + backward ~ 3 evaluations per sample
    log.warning("%s; textual inversion adds about %.0f min per class (%d steps x batch %d, with gradients)",
                message, calls * seconds / 60, s.inversion.steps, s.inversion.batch)
