"""Stable-Diffusion-sized models on the CPU: one warning per process, with the measured cost.

A 512-px SD image takes minutes on a CPU, and a build adds textual inversion
(hundreds of UNet evaluations with gradients per class). Rendering such a
model on the CPU is allowed, but not silently: the first time a process is
about to, :func:`cpu_cost_message` times one UNet evaluation at the archive's
latent size on one thread (what CPU rendering uses) and says what an image
costs; later calls return None. ``Regenerator`` emits it as a warning; the
builder logs it, with its inversion added, before its first class.
"""

from __future__ import annotations

import threading
import time

import torch

SD_SIZED_PARAMETERS = 100_000_000  # UNet parameters from which a model is SD-sized (SD 1.5: 860M; built-in: 3M)

_warned = False
_lock = threading.Lock()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


@torch.no_grad()
def seconds_per_unet_call(pipe, latent_shape) -> float:
    """One UNet evaluation (batch 1, zero inputs, one thread) on the pipeline's device, timed."""
    from .generator import single_thread

    unet, text = pipe.unet, pipe.text_encoder
    latents = torch.zeros(1, *latent_shape, dtype=unet.dtype, device=unet.device)
    context = torch.zeros(1, pipe.tokenizer.model_max_length, text.config.hidden_size, dtype=unet.dtype,
                          device=unet.device)
    with single_thread():
        start = time.perf_counter()
        unet(latents, torch.tensor(999, device=unet.device), encoder_hidden_states=context)
        return time.perf_counter() - start


def cpu_cost_message(pipe, latent_shape, steps: int, guidance_scale: float) -> tuple[str, float] | None:
    """(message, seconds per UNet evaluation) the first time an SD-sized UNet is about to run on the CPU, else None."""
    global _warned
    if _warned or pipe.unet.device.type != "cpu":
        return None
    params = sum(p.numel() for p in pipe.unet.parameters())
    if params < SD_SIZED_PARAMETERS:
        return None
    with _lock:
        if _warned:
            return None
        _warned = True
    seconds = seconds_per_unet_call(pipe, latent_shape)
    calls = steps * (2 if guidance_scale > 1 else 1)
    return (f"a Stable-Diffusion-sized model ({params / 1e6:.0f}M UNet parameters) is rendering on the CPU: one UNet "
            f"evaluation at latents {list(latent_shape)} took {seconds:.1f} s here, so each image costs about "
            f"{_duration(calls * seconds)} ({steps} steps{' x 2 for guidance' if calls > steps else ''}); "
            "use a GPU (device='cuda') for real work", seconds)
