"""Mixed precision for textual inversion: fp32 master vectors, the frozen model in the render dtype.

The scheme of diffusers' textual-inversion script, made explicit:

- the trainable slot vectors and the optimizer's state are float32 (the
  ``SlotEmbedding`` parameter; AdamW keeps its moments in the parameter's dtype);
- the frozen text encoder, UNet and VAE stay in the dtype the archive renders in
  (``--dtype``; fp16 by default on CUDA) and run under autocast in that dtype;
- in fp16 the loss is multiplied by a dynamic scale before ``backward``
  (``torch.amp.GradScaler``), so gradients that fp16 cannot represent (SD's
  per-element gradients reach below fp16's smallest subnormal, 6e-8) survive the
  backward pass; the scale is divided out of the fp32 gradient before the
  optimizer step, and a step whose gradient holds inf or NaN is skipped (and
  counted). bf16 has float32's range and needs no scale; fp32 needs no autocast.
"""

from __future__ import annotations

import contextlib

import torch


def frozen_dtype(pipe) -> torch.dtype:
    """The dtype the frozen model's weights are in (the render dtype)."""
    return pipe.unet.dtype


def frozen_autocast(pipe):
    """Autocast in the frozen model's dtype on its device, or nothing for float32."""
    dtype = frozen_dtype(pipe)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(pipe.unet.device.type, dtype=dtype)


def loss_scaler(pipe) -> torch.amp.GradScaler:
    """A dynamic loss scaler, enabled only when the frozen model is fp16 (a pass-through otherwise)."""
    return torch.amp.GradScaler(pipe.unet.device.type, enabled=frozen_dtype(pipe) == torch.float16)


def scaled_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Backward through ``loss`` (scaled), then the optimizer step unless the gradient overflowed.

    Returns:
        True when the step was taken, False when it was skipped for an inf/NaN gradient.
    """
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if not scaler.is_enabled():
        opt.step()
        return True
    scale = scaler.get_scale()
    scaler.step(opt)  # unscales, and skips the step when a gradient is inf/NaN
    scaler.update()
    return scaler.get_scale() >= scale  # the scale only drops after a skipped step
