"""The frozen model's denoising loss on the class's collages, with the class token as the only trainable input.

The token-embedding module is swapped for one that reads the slot rows from a
small trainable parameter (:class:`SlotEmbedding`), so the rest of the
vocabulary cannot drift; the loss is the noise-prediction (or velocity) MSE of
diffusers' textual-inversion script, and :func:`validation_loss` scores a vector
on fixed (collage, timestep, noise) triples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .precision import frozen_autocast


@dataclass(frozen=True)
class ValidationSet:
    """Fixed (clean latent, timestep, noise) triples on which every candidate vector is scored."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor


class SlotEmbedding(torch.nn.Module):
    """A token-embedding table whose ``slot_ids`` rows come from a trainable parameter."""

    def __init__(self, base: torch.nn.Embedding, slot_ids: list[int], init: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("slot_ids", torch.tensor(slot_ids), persistent=False)
        self.vectors = torch.nn.Parameter(init.clone().float())

    @property
    def weight(self):  # what CLIPTextEmbeddings and resize helpers read
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.base.weight.index_put((self.slot_ids,), self.vectors.to(self.base.weight.dtype))
        return F.embedding(ids, table)


@contextlib.contextmanager
def swapped_token_embedding(text_encoder, module):
    """Temporarily replace the text encoder's token-embedding module."""
    original = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(module)
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(original)


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Images in [0, 1] -> scaled VAE latents (posterior means)."""
    vae = pipe.vae
    out = []
    for chunk in images.split(batch):
        x = chunk.to(vae.device, vae.dtype) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out).float()


def sample_timesteps(n: int, num_train_timesteps: int, how: str, g: torch.Generator) -> torch.Tensor:
    """``n`` timesteps: i.i.d. uniform, or stratified (one uniform draw in each of ``n`` equal strata)."""
    if how == "uniform":
        return torch.randint(num_train_timesteps, (n,), generator=g)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return ((torch.arange(n, dtype=torch.float64) + u) * num_train_timesteps / n).long().clamp_(max=num_train_timesteps - 1)


def draw_validation_set(latents: torch.Tensor, size: int, num_train_timesteps: int, g: torch.Generator) -> ValidationSet:
    """``size`` triples from ``g`` alone: collages cycled in a random order, stratified timesteps, fresh noise."""
    order = torch.randperm(len(latents), generator=g)
    pick = order[torch.arange(size) % len(latents)]
    t = sample_timesteps(size, num_train_timesteps, "stratified", g)
    noise = torch.randn((size, *latents.shape[1:]), generator=g)
    return ValidationSet(latents[pick], t, noise)


def denoising_loss(pipe, ids: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, noise_sched,
                   reduction: str = "mean") -> torch.Tensor:
    """MSE between the frozen UNet's prediction (conditioned on prompt ``ids``) and its target at ``t``."""
    device = pipe.unet.device
    z0, noise, t = z0.to(device), noise.to(device), t.to(device)
    zt = noise_sched.add_noise(z0, noise, t)
    target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(z0, noise, t)
    with frozen_autocast(pipe):
        cond = pipe.text_encoder(ids.expand(len(z0), -1))[0]
        pred = pipe.unet(zt.to(pipe.unet.dtype), t, encoder_hidden_states=cond).sample
    err = (pred.float() - target.float()).pow(2)
    return err.mean() if reduction == "mean" else err.flatten(1).mean(1)


@torch.no_grad()
def validation_loss(pipe, ids: torch.Tensor, val: ValidationSet, noise_sched, batch: int) -> float:
    """Mean denoising loss over the fixed validation triples (batched; same value whatever ``batch``)."""
    total = 0.0
    for start in range(0, len(val.latents), batch):
        sl = slice(start, start + batch)
        total += float(denoising_loss(pipe, ids, val.latents[sl], val.timesteps[sl], val.noise[sl], noise_sched,
                                      reduction="none").double().sum())
    return total / len(val.latents)
