"""The fast path on CUDA: SDPA attention, channels-last, fp32 VAE decode, optional ``torch.compile``.

Applied once per shared pipeline by ``generator.shared_pipeline``. On the CPU
in fp32 nothing here runs, so CPU pixels stay exactly what the spec's tests pin. Every
choice is a function of (device type, dtype, compile), all three of which are
in the pixel-cache key (``RenderSettings.key_parts``), so a changed choice
never reuses pixels rendered under another.

- SDPA: diffusers' ``AttnProcessor2_0`` (``torch.nn.functional.scaled_dot_product_attention``,
  flash / memory-efficient kernels on CUDA); set explicitly in case a model
  was saved with another processor.
- channels-last: the UNet's and VAE's convolutions run NHWC, which is what
  fp16/bf16 tensor-core convolutions want; same maths, same module.
- VAE in fp32 when the pipeline is fp16 and the VAE's config says
  ``force_upcast`` (SD 1.x's VAE overflows fp16 in its decoder: NaN or black
  images). ``Regenerator`` additionally checks every decode for non-finite
  values and never returns them (see :func:`decode_latents` below).
- ``torch.compile`` of the UNet: off by default; a compiled pipeline is a
  separate cache entry that shares the eager one's weights.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .errors import D3MError

_UPCAST_LOCK = threading.Lock()


def uses_fast_path(device: str) -> bool:
    """The CUDA-only settings apply to this device."""
    return torch.device(device).type == "cuda"


def vae_needs_fp32(vae, dtype: str) -> bool:
    """fp16 pipelines decode in fp32 when the VAE's config asks for it (``force_upcast``)."""
    return dtype == "float16" and bool(getattr(vae.config, "force_upcast", False))


def prepare_pipeline(pipe, device: str, dtype: str) -> None:
    """Apply the fast-path settings to a freshly loaded pipeline, in place."""
    if vae_needs_fp32(pipe.vae, dtype):
        pipe.vae.to(torch.float32)
    if not uses_fast_path(device):
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    for module in (pipe.unet, pipe.vae):
        if not all(isinstance(p, AttnProcessor2_0) for p in module.attn_processors.values()):
            module.set_attn_processor(AttnProcessor2_0())
        module.to(memory_format=torch.channels_last)


def compiled_unet(unet):
    """``torch.compile`` of the UNet (lazy: compilation happens on the first call per batch shape)."""
    return torch.compile(unet, fullgraph=False, dynamic=False)


def decode_latents(pipe, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """SPEC step 6: VAE decode to [0, 1], exactly as the pipeline's own ``output_type="pt"`` path.

    A decode in fp16/bf16 that is not finite everywhere (VAE overflow: NaN or
    black images) is redone in fp32 for the whole batch, with a warning; a
    non-finite fp32 decode is an error. Never returns non-finite pixels.
    Returns (images, how many images were redone in fp32).
    """
    vae = pipe.vae
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    redone = 0
    if not torch.isfinite(image).all():
        if vae.dtype == torch.float32:
            raise D3MError("the VAE decoded non-finite pixels in float32: the latents are out of range or the "
                           "model's VAE weights are broken; check the model files and the archive's generator settings")
        warnings.warn(f"VAE decode overflowed in {vae.dtype}; redoing {len(latents)} images in float32", stacklevel=3)
        with _UPCAST_LOCK:
            before = vae.dtype
            vae.to(torch.float32)
            try:
                image = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
            finally:
                vae.to(before)
        redone = len(latents)
        if not torch.isfinite(image).all():
            raise D3MError("the VAE decoded non-finite pixels even in float32: the latents themselves are out of "
                           f"range; render with dtype='float32' (this run used {latents.dtype})")
    return pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * len(image)), redone
