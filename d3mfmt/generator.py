"""Recipe -> pixels: the one implementation of SPEC.md "Regeneration".

``Regenerator`` turns (class embedding, seed) into an image exactly as the spec
says; ``D3MDataset``, ``d3m-inspect`` and the builder's soft labelling all call
it, so labels are computed on the pixels consumers see. Loaded models live in a
process-wide cache keyed by (model identity, device, dtype), shared by every
archive that names the same weights.

Example:
    >>> import d3mfmt
    >>> from d3mfmt.generator import Regenerator
    >>> archive = d3mfmt.load_file("spec/vectors/topk.d3m")        # doctest: +SKIP
    >>> regen = Regenerator(archive.manifest.generator, archive.embeddings)  # doctest: +SKIP
    >>> regen.render(7, archive.seeds[7].tolist()).shape            # doctest: +SKIP
    torch.Size([2, 3, 64, 64])
    >>> regen.render_pairs([(0, 11), (7, 12), (3, 13)]).shape       # doctest: +SKIP
    torch.Size([3, 3, 64, 64])
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import accel
from .cpucost import cpu_cost_message
from .devices import check_device, default_device
from .schedulers import PIPELINES, SCHEDULER_KEYS, check_scheduler_config
from .errors import D3MError, D3MModelError
from .manifest import GeneratorInfo
from .modelpin import check_pin, model_files, render_files
from .models import resolve_model
from .prompts import encode_class_prompt, encode_text
from .render import DTYPE_NAMES, RenderOptions, checked
from .renderable import RenderLimits, check_cost

DEFAULT_RENDER_BATCH = 16  # images per pipeline call (D3MDataset, d3m-inspect verify and preview)
CPU_CALL_ROWS = 2  # images in every CPU pipeline call, whatever was asked for (see Regenerator.render_pairs)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

_PIPELINES: dict[tuple[str, str, str, bool], "object"] = {}
_PIPELINES_LOCK = threading.RLock()


def default_dtype(device: str) -> str:
    """fp16 on CUDA, fp32 elsewhere."""
    return "float16" if torch.device(device).type == "cuda" else "float32"


def shared_pipeline(path, identity: str, device: str, dtype: str, compile: bool = False, variant: str | None = None):
    """The process-wide StableDiffusionPipeline for (identity, device, dtype, compile).

    Loads exactly the files ``model_files(path, variant)`` pins: safetensors
    only (never a pickled ``.bin``), the weight ``variant`` (``"fp16"``...; None:
    the plain files, or the only variant present, as ``model_files`` decides),
    no safety checker or feature extractor. ``identity`` (``model_files(path, variant).identity()``)
    keys the cache. On CUDA the fast path of ``d3mfmt.accel`` is applied once, at
    load. A compiled pipeline shares the eager one's modules, its UNet wrapped
    in ``torch.compile``.
    """
    from diffusers import StableDiffusionPipeline

    variant = model_files(path, variant).variant  # None: the plain files, or the only variant present

    key = (identity, str(torch.device(device)), dtype, bool(compile))
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.get(key)
        if pipe is None and compile:
            eager = shared_pipeline(path, identity, device, dtype, variant=variant)
            pipe = _with_scheduler(eager, type(eager.scheduler).__name__, dict(eager.scheduler.config),
                                   unet=accel.compiled_unet(eager.unet))
            _PIPELINES[key] = pipe
        elif pipe is None:
            with _quiet_loading():
                # torch_dtype: the spelling every supported diffusers accepts (newer ones also take dtype=)
                pipe = StableDiffusionPipeline.from_pretrained(
                    path, torch_dtype=DTYPES[dtype], variant=variant, use_safetensors=True, safety_checker=None,
                    feature_extractor=None, image_encoder=None, requires_safety_checker=False, local_files_only=True,
                )
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            for module in (pipe.unet, pipe.vae, pipe.text_encoder):
                module.requires_grad_(False)  # frozen: consumers never train, the builder only learns token rows
            accel.prepare_pipeline(pipe, device, dtype)
            _PIPELINES[key] = pipe
    return pipe


@contextlib.contextmanager
def single_thread():
    """Run torch ops on one intra-op thread, then restore the previous count.

    Measured on this project's CPUs: with 2 threads the same image comes out
    different (by one 8-bit level in places) at batch sizes 1 and 3 than at 2,
    4, 8 and 16, because the threads split reductions by batch shape. One
    thread is necessary but not enough: kernels still choose their blocking by
    shape, which is why ``Regenerator.render_pairs`` also fixes the CPU batch
    shape. Parallelism on the CPU comes from DataLoader workers instead.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_loading():
    """No per-component progress bars or info chatter while a model loads."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def initial_latents(seeds, latent_shape) -> torch.Tensor:
    """SPEC step 5: one CPU generator per image, float32 ``[B, *latent_shape]``."""
    return torch.cat(
        [torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    )


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """SPEC step 7: float32 images in [0, 1] on the 8-bit grid k/255."""
    return torch.round(images.float().clamp(0, 1) * 255.0) / 255.0


def fingerprint(images: torch.Tensor, size: int) -> np.ndarray:
    """SPEC "Fingerprint": channel mean, size x size block means, uint8 ``[B, size, size]``."""
    x = images.detach().to("cpu", torch.float64).numpy()
    b, _, h, w = x.shape
    blocks = x.mean(axis=1).reshape(b, size, h // size, size, w // size).mean(axis=(2, 4))
    return np.floor(255.0 * np.clip(blocks, 0.0, 1.0) + 0.5).astype(np.uint8)


def split_patches(images: torch.Tensor, grid: int) -> torch.Tensor:
    """SPEC step 8: ``[B, 3, H, W]`` -> ``[B, grid*grid, 3, H/grid, W/grid]``, row-major."""
    b, ch, h, w = images.shape
    x = images.reshape(b, ch, grid, h // grid, grid, w // grid)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, ch, h // grid, w // grid)


def _version_of(package: str) -> str | None:
    """An installed distribution's version, or None when it is absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


@dataclass(frozen=True)
class RenderSettings:
    """What, besides the archive, determines the pixels: part of every cache key."""

    model_identity: str
    device: str
    dtype: str
    compile: bool = False
    variant: str | None = None  # the weight files loaded; the identity already tells them apart

    def key_parts(self) -> dict:
        import diffusers
        import transformers

        parts = {
            "model_identity": self.model_identity,
            "device": torch.device(self.device).type,
            "dtype": self.dtype,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,  # the text encoder and tokenizer behind every prompt
            "tokenizers": _version_of("tokenizers"),
        }
        if self.compile:  # compiled kernels may round differently: never share eager pixels
            parts["compile"] = True
        return parts


def resolve_render_settings(generator: GeneratorInfo, render: RenderOptions | None = None):
    """(model folder, RenderSettings) for an archive's generator under ``render``, without loading the model.

    ``render.variant`` overrides the weight variant the archive records
    (``generator.model.variant``). Raises D3MError for a non-deterministic
    scheduler, a bad option or device, and D3MModelError when the model is
    missing, unsupported, or differs from the pinned identity.
    """
    render = checked(render)
    # the reader's rules, also for a GeneratorInfo made in code: pipeline, deterministic scheduler, config
    if generator.pipeline not in PIPELINES:
        raise D3MError(f"generator.pipeline {generator.pipeline!r} is not supported; this version renders "
                       f"{list(PIPELINES)} archives (SD 1.x/2.x)")
    check_scheduler_config(generator.scheduler, generator.scheduler_config, generator.steps)
    device = render.device or default_device()
    check_device(device)
    dtype = render.dtype or default_dtype(device)
    revision = None if render.model else generator.model.revision
    wanted = render.variant if render.variant is not None else generator.model.variant
    path = resolve_model(render.model or generator.model.id, revision, allow_download=render.allow_download,
                         variant=wanted)
    files = render_files(generator.model, path, wanted, render.variant is None and render.allow_model_mismatch)
    identity = files.identity()
    check_pin(generator.model, path, files, identity, render.allow_model_mismatch)
    return path, RenderSettings(identity, device, dtype, render.compile, files.variant)


class Regenerator:
    """Renders an archive's images through a cached diffusers pipeline.

    Args:
        generator: the archive's ``manifest.generator``.
        embeddings: the archive's ``[C, V, D]`` embeddings.
        render: model, device, dtype and switches (:class:`d3mfmt.RenderOptions`;
            default: the archive's model, CUDA+fp16 when available, else CPU+fp32).
            With ``compile=True`` the first call per batch shape compiles, minutes on a GPU.
        num_images: the images of the archive, for the total render cost (default: one per class).

    The render cost is checked against ``render.limits`` or, by default,
    ``RenderLimits.for_model`` of the UNet actually loaded, before anything renders
    (SPEC.md "Render cost"): a small model named by another path is bounded by its own size.
    """

    def __init__(self, generator: GeneratorInfo, embeddings: np.ndarray, render: RenderOptions | None = None, *,
                 num_images: int | None = None):
        # 1. check inputs; resolve the model and compare it with the archive's pin
        self.info = generator
        render = checked(render)
        self.model_path, self.settings = resolve_render_settings(generator, render)
        self.device, self.dtype = self.settings.device, self.settings.dtype
        check_device(self.device)
        identity = self.settings.model_identity
        # 2. a pipeline of our own scheduler over the shared components
        shared = shared_pipeline(self.model_path, identity, self.device, self.dtype, self.settings.compile,
                                 self.settings.variant)
        self.pipe = _with_scheduler(shared, generator.scheduler, generator.scheduler_config)
        self._check_embeddings(embeddings)
        self._check_cost(render.limits, len(embeddings) if num_images is None else num_images)
        cost = cpu_cost_message(self.pipe, generator.latent_shape, generator.steps, generator.guidance_scale)
        if cost is not None:  # once per process
            warnings.warn(cost[0], RuntimeWarning, stacklevel=2)
        self.embeddings = embeddings
        self._prompt_cache: dict[int, torch.Tensor] = {}
        self._negative: torch.Tensor | None = None
        self.fp32_redecodes = 0  # images whose low-precision decode was not finite and was redone in fp32
        self.images_rendered = 0  # images render_pairs returned (padding rows not counted)

    def _check_embeddings(self, embeddings: np.ndarray) -> None:
        info, pipe = self.info, self.pipe
        factor = pipe.vae_scale_factor
        expected = (pipe.unet.config.in_channels, info.height // factor, info.width // factor)
        if tuple(info.latent_shape) != expected or info.height % factor or info.width % factor:
            raise D3MModelError(
                f"generator.latent_shape {list(info.latent_shape)} does not fit {info.height}x{info.width} px with "
                f"this model (VAE factor {factor}, {pipe.unet.config.in_channels} latent channels): expected {list(expected)}"
            )
        width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        if embeddings.shape[2] != width:
            raise D3MModelError(
                f"the archive's embeddings are {embeddings.shape[2]} wide, the text encoder of "
                f"{self.model_path} takes {width}; the archive was made for another model"
            )

    def _check_cost(self, limits: RenderLimits | None, num_images: int) -> None:
        """The render cost against ``limits``, by default the loaded UNet's own (``RenderLimits.for_model``)."""
        side = self.pipe.unet.config.sample_size
        side = side if isinstance(side, int) else min(side)  # some configs give [height, width]
        where = "the reader" if limits is not None else f"the loaded model ({self.model_path}, UNet sample size {side})"
        check_cost(self.info, num_images, RenderLimits.for_model(side) if limits is None else limits, limit_of=where)

    def prompt_embeds(self, c: int) -> torch.Tensor:
        """SPEC step 3: the class's prompt embedding ``[1, L, D']``, cached per class."""
        if c not in self._prompt_cache:
            info = self.info
            self._prompt_cache[c] = encode_class_prompt(self.pipe, info.prompt_template, info.placeholder,
                                                        self.embeddings[c])
        return self._prompt_cache[c]

    def negative_embeds(self) -> torch.Tensor:
        if self._negative is None:
            self._negative = encode_text(self.pipe, self.info.negative_prompt)
        return self._negative

    def render(self, c: int, seeds) -> torch.Tensor:
        """Images of class ``c`` for ``seeds``: float32 ``[B, 3, H, W]`` on the CPU, 8-bit levels."""
        return self.render_pairs([(c, s) for s in seeds])

    @torch.no_grad()
    def render_pairs(self, pairs) -> torch.Tensor:
        """Images for ``(class, seed)`` pairs of any classes, in one pipeline call.

        Each row gets its own class's prompt embedding. On the CPU the pixels
        of a pair do not depend on the batch it is asked for in: measured here,
        CPU kernels (oneDNN convolutions, MKL matmuls) pick their blocking by
        tensor shape, so the same image differs by one 8-bit level between
        batch sizes even on one thread, while at one fixed shape every batch
        position and batch-mate gives identical pixels. So the CPU renders
        every call with exactly ``CPU_CALL_ROWS`` images on one thread, padding
        the last call by repeating its final pair. CUDA renders the batch as
        asked (throughput first; drift is what ``d3m-inspect verify`` measures).
        """
        check_device(self.device)
        pairs = [(int(c), int(s)) for c, s in pairs]
        if not pairs:
            return torch.empty((0, 3, self.info.height, self.info.width))
        self.images_rendered += len(pairs)
        if torch.device(self.device).type != "cpu":
            return self._render(pairs)
        out = []
        with single_thread():
            for start in range(0, len(pairs), CPU_CALL_ROWS):
                chunk = pairs[start : start + CPU_CALL_ROWS]
                padded = chunk + chunk[-1:] * (CPU_CALL_ROWS - len(chunk))
                out.append(self._render(padded)[: len(chunk)])
        return torch.cat(out)

    def _render(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        info, n = self.info, len(pairs)
        latents = initial_latents([s for _, s in pairs], info.latent_shape).to(self.device, DTYPES[self.dtype])
        prompt = torch.cat([self.prompt_embeds(c) for c, _ in pairs])
        kwargs = {}
        if info.guidance_scale > 1:
            kwargs["negative_prompt_embeds"] = self.negative_embeds().expand(n, -1, -1)
        latents = self.pipe(
            prompt_embeds=prompt,
            latents=latents,
            num_inference_steps=info.steps,
            guidance_scale=info.guidance_scale,
            eta=0.0,
            height=info.height,
            width=info.width,
            output_type="latent",
            **kwargs,
        ).images
        if not torch.isfinite(latents).all():
            raise D3MError(
                f"the UNet produced non-finite latents in {self.dtype} on {self.device} (numeric overflow); "
                "render with dtype='bfloat16' or dtype='float32'"
            )
        images, redone = accel.decode_latents(self.pipe, latents)
        self.fp32_redecodes += redone
        return quantize_8bit(images.to("cpu"))


def applied_scheduler_config(pipe, scheduler: str, config: dict) -> dict:
    """The config ``Regenerator`` really renders with for (``scheduler``, ``config``) on ``pipe``'s modules.

    ``StableDiffusionPipeline`` rewrites some values of the scheduler it is given
    (``clip_sample`` true -> false, ``steps_offset`` -> 1, deprecations of old
    configs); a manifest that records the config before that rewrite describes
    a render no one does. The result is a fixed point: rendering it applies it unchanged.
    """
    with warnings.catch_warnings():  # the pipeline's deprecation notes about the rewritten keys
        warnings.simplefilter("ignore", FutureWarning)
        applied = _with_scheduler(pipe, scheduler, config).scheduler.config
    # keys the scheduler does not take (a PNDM config's skip_prk_steps carried into DDIM) change nothing
    # in the render, and the format refuses them
    taken = SCHEDULER_KEYS[scheduler]  # callers pass a scheduler the format allows
    return {k: v for k, v in applied.items() if k in taken}


def _with_scheduler(shared, scheduler: str, config: dict, unet=None):
    """A pipeline over ``shared``'s modules with the archive's own scheduler (and optionally another UNet)."""
    import diffusers

    sched = getattr(diffusers, scheduler).from_config(config)
    pipe = diffusers.StableDiffusionPipeline(
        vae=shared.vae,
        text_encoder=shared.text_encoder,
        tokenizer=shared.tokenizer,
        unet=shared.unet if unet is None else unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
