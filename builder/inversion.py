"""Textual inversion: one new token embedding per class, everything else frozen.

After Gal et al. (and diffusers' textual_inversion example): the class's
collages are encoded once to latents; at every step a batch of them is noised
at random timesteps and the frozen UNet, conditioned on the template prompt
("a collage of <token>"), predicts the noise. Only the placeholder's
input-embedding rows receive gradients: the token-embedding module is
swapped for one that reads those rows from a small trainable parameter, so the
rest of the vocabulary cannot drift (diffusers' script restores the other rows
after every step to the same effect).

The training loss is a mean over random collages, timesteps and noise, so its
curve cannot tell progress from chance. Progress is measured instead on a fixed
validation set per class: ``val_size`` (collage, timestep, noise) triples drawn
once, before training, from their own generator, with timesteps stratified over
the whole schedule. The vector is evaluated on it at step 0 (the initialising
word) and every ``val_every`` steps, and the best one is kept, so inversion can
never return a vector that denoises the class's collages worse than the word it
started from.

Numerics (builder/precision.py): the vectors and AdamW's state are float32; the
frozen model runs in the render dtype (``--dtype``) under autocast, with a
dynamic loss scale in fp16 (an overflowing step is skipped and counted).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from d3mfmt.prompts import placeholder_prompt
from d3mfmt.terminal import printable

from .initialisers import initial_vectors, mean_token_norm
from .precision import frozen_autocast, loss_scaler, scaled_step

log = logging.getLogger("d3m-build")


@dataclass(frozen=True)
class InversionSettings:
    """Textual inversion of one class token (``None``: the model's default, builder/settings.py)."""

    steps: int | None = None  # None: the model's default (builder/settings.py)
    lr: float | None = None
    batch: int | None = None
    n_vectors: int = 1
    weight_decay: float = 0.0
    generic_word: str = "object"  # initialiser only for a class name without any tokenizable text
    timesteps: str = "uniform"  # training timesteps per batch: "uniform" (i.i.d.) or "stratified" (one per stratum)
    val_size: int = 32  # fixed validation triples (collage, timestep, noise) per class
    val_every: int = 10  # validate (and keep the best vector) every N steps


TIMESTEP_SAMPLING = ("uniform", "stratified")


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


def log_inversion(class_name: str, init_word: str, stats: dict, curve: list[float], steps: int) -> None:
    """One log line per class: the initialising word, and how far validation got below it."""
    init, best = stats["val_loss_init"], stats["val_loss_best"]
    change = 100 * (best - init) / init if init else 0.0
    log.info("class %s: init %r, val loss %.4f -> %.4f (%+.1f%%, at step %d of %d; validation %.1fs)%s",
             printable(class_name), init_word, init, best, change, stats["best_step"], steps, stats["val_seconds"],
             f", train loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "")


def invert_class_token(pipe, collages: torch.Tensor, class_name: str, template: str, placeholder: str,
                       settings: InversionSettings, g: torch.Generator,
                       val_g: torch.Generator) -> tuple[np.ndarray, list[float], dict]:
    """Learn ``[n_vectors, D]`` so the frozen model renders ``collages`` from the template prompt.

    Logs (logger ``d3m-build``) the initialising word and the validation loss it reached.

    Args:
        g: the training stream (batches, timesteps, noise).
        val_g: draws the fixed validation set only, so validation never changes the training stream.

    Returns:
        (the best vectors on the validation set as float32 numpy, mean training loss of each tenth of
        the run, ``{"val_loss_init", "val_loss_best", "best_step", "val_curve", "val_seconds",
        "skipped_steps", "init_words", "norm_init", "norm_best", "vocab_norm"}``; best_step 0 is the
        initialisation, val_curve the (step, validation loss) pairs scored, val_seconds their cost,
        skipped_steps the fp16 steps skipped for overflow, norms the mean L2 norm over slots and
        the vocabulary's mean token norm).
    """
    from diffusers import DDPMScheduler

    # 1. fixed inputs: latents of the class's collages, the prompt's token ids, the validation triples
    latents = encode_latents(pipe, collages)
    ids, slots = placeholder_prompt(pipe, template, placeholder, settings.n_vectors)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    num_t = noise_sched.config.num_train_timesteps
    val = draw_validation_set(latents, settings.val_size, num_t, val_g)
    # 2. the only trainable tensor: the slot rows, initialised from the class's name (builder/initialisers.py)
    init, init_words = initial_vectors(pipe, class_name, settings.n_vectors, settings.generic_word)
    slot_module = SlotEmbedding(pipe.text_encoder.get_input_embeddings(), slots, init)
    opt = torch.optim.AdamW([slot_module.vectors], lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
    scaler, skipped = loss_scaler(pipe), 0  # fp16: scaled loss, inf/NaN steps skipped (builder/precision.py)
    losses = []
    with swapped_token_embedding(pipe.text_encoder, slot_module):
        # 3. score the initialising word: the vector to beat
        best = slot_module.vectors.detach().clone()
        t0 = time.perf_counter()
        val_init = val_best = validation_loss(pipe, ids, val, noise_sched, settings.batch)
        val_seconds = time.perf_counter() - t0
        best_step, val_curve = 0, [(0, val_init)]
        # 4. noise-prediction MSE over random collages and timesteps; validate every val_every steps, keep the best
        for step in range(1, settings.steps + 1):
            pick = torch.randint(len(latents), (settings.batch,), generator=g)
            noise = torch.randn(latents[pick].shape, generator=g)
            t = sample_timesteps(settings.batch, num_t, settings.timesteps, g)
            loss = denoising_loss(pipe, ids, latents[pick], t, noise, noise_sched)
            skipped += not scaled_step(loss, opt, scaler)
            losses.append(float(loss.detach()))
            if step % settings.val_every == 0 or step == settings.steps:
                t0 = time.perf_counter()
                current = validation_loss(pipe, ids, val, noise_sched, settings.batch)
                val_seconds += time.perf_counter() - t0
                val_curve.append((step, current))
                if current < val_best:
                    val_best, best_step, best = current, step, slot_module.vectors.detach().clone()
    tenth = max(1, len(losses) // 10)
    curve = [float(np.mean(losses[i : i + tenth])) for i in range(0, len(losses), tenth)]
    stats = {"val_loss_init": val_init, "val_loss_best": val_best, "best_step": best_step, "val_curve": val_curve,
             "val_seconds": val_seconds, "skipped_steps": skipped,
             "init_words": init_words, "norm_init": float(init.norm(dim=1).mean()),
             "norm_best": float(best.norm(dim=1).mean()), "vocab_norm": mean_token_norm(pipe)}
    log_inversion(class_name, " ".join(init_words), stats, curve, settings.steps)
    return best.cpu().numpy().astype(np.float32), curve, stats
