"""Inversion numerics: fp32 master vectors, the frozen model in fp16 (loss-scaled) or bf16, on the built-in weights.

The gradient reaching the trainable vector is compared with the all-fp32 one,
at loss scales that give the built-in model Stable Diffusion's per-element
gradient size: the batch loss is a mean over latent elements, so SD 1.5's
4 x 64 x 64 and SD 2.1's 4 x 96 x 96 latents (batch 4) make every element's
gradient smaller by the ratio of element counts. fp16 really runs here (the
tiny model's ops all have CPU fp16 kernels); no emulation.
"""

import pytest
import torch

from builder.denoising import SlotEmbedding, denoising_loss, encode_latents, swapped_token_embedding
from builder.initialisers import initial_vectors
from builder.patches import make_collages
from builder.precision import frozen_autocast, loss_scaler, scaled_step
from builder.sources import MnistSource
from d3mfmt.generator import shared_pipeline
from d3mfmt.modelpin import model_identity
from d3mfmt.models import BUILTIN_MODELS, resolve_model
from d3mfmt.prompts import placeholder_prompt

TEMPLATE = BUILTIN_MODELS["d3m/tiny-mnist"].collage_template.replace("{}", "{token}")
SD_ELEMENTS = {"sd15-512": 4 * 4 * 64 * 64, "sd21-768": 4 * 4 * 96 * 96}


@pytest.fixture(scope="module")
def inputs():
    path = resolve_model("d3m/tiny-mnist")
    fp32 = shared_pipeline(path, model_identity(path), "cpu", "float32")
    z0 = encode_latents(fp32, make_collages(MnistSource("train").images(7, side=32, limit=16), 2))
    g = torch.Generator().manual_seed(0)
    return path, z0, torch.randint(1000, (len(z0),), generator=g), torch.randn(z0.shape, generator=g)


def vector_gradient(inputs, dtype: str, loss_scale: float, scaled: bool = True) -> torch.Tensor:
    """The fp32 gradient on the slot vector (unscaled), the frozen model in ``dtype``."""
    from diffusers import DDPMScheduler

    path, z0, t, noise = inputs
    pipe = shared_pipeline(path, model_identity(path), "cpu", dtype)
    ids, slots = placeholder_prompt(pipe, TEMPLATE, "{token}", 1)
    slot_module = SlotEmbedding(pipe.text_encoder.get_input_embeddings(), slots, initial_vectors(pipe, "seven", 1, "object")[0])
    opt = torch.optim.AdamW([slot_module.vectors])
    scaler = loss_scaler(pipe) if scaled else torch.amp.GradScaler("cpu", enabled=False)
    with swapped_token_embedding(pipe.text_encoder, slot_module):
        loss = denoising_loss(pipe, ids, z0, t, noise, DDPMScheduler.from_config(pipe.scheduler.config)) * loss_scale
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # what scaled_step does before the optimizer step
    assert slot_module.vectors.dtype == torch.float32 and slot_module.vectors.grad.dtype == torch.float32
    return slot_module.vectors.grad.flatten().double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("sd", list(SD_ELEMENTS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_gradient_agrees_with_fp32_at_sd_loss_scales(inputs, dtype, sd):
    z0 = inputs[1]
    loss_scale = z0.numel() / SD_ELEMENTS[sd]
    reference = vector_gradient(inputs, "float32", loss_scale)
    assert cosine(reference, vector_gradient(inputs, dtype, loss_scale)) >= 0.99


def test_fp16_without_loss_scaling_loses_the_gradient(inputs):
    # 100x below SD 2.1's gradient size (a late, well-fitted batch): unscaled fp16 underflows, the scaler does not
    loss_scale = inputs[1].numel() / SD_ELEMENTS["sd21-768"] / 100
    reference = vector_gradient(inputs, "float32", loss_scale)
    assert cosine(reference, vector_gradient(inputs, "float16", loss_scale, scaled=False)) < 0.9
    assert cosine(reference, vector_gradient(inputs, "float16", loss_scale)) >= 0.99


def test_autocast_and_scaler_follow_the_frozen_dtype(inputs):
    path = inputs[0]
    kinds = {}
    for dtype in ("float32", "float16", "bfloat16"):
        pipe = shared_pipeline(path, model_identity(path), "cpu", dtype)
        kinds[dtype] = (type(frozen_autocast(pipe)).__name__, loss_scaler(pipe).is_enabled())
    assert kinds == {"float32": ("nullcontext", False), "float16": ("autocast", True), "bfloat16": ("autocast", False)}


def test_an_overflowing_fp16_step_is_skipped_and_the_vector_kept():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    assert not scaled_step((param * float("inf")).sum(), opt, scaler)
    assert torch.equal(param.detach(), torch.ones(3))
    assert scaled_step((param * 2).sum(), opt, scaler)
    assert not torch.equal(param.detach(), torch.ones(3))
