"""Textual inversion: one new token embedding per class, everything else frozen.

After Gal et al. (and diffusers' textual_inversion example): the class's
collages are encoded once to latents; at every step a batch of them is noised
at random timesteps and the frozen UNet, conditioned on the template prompt
("a collage of <token>"), predicts the noise. Only the placeholder's
input-embedding rows receive gradients: the token-embedding module is
swapped for one that reads those rows from a small trainable parameter, so the
rest of the vocabulary cannot drift (diffusers' script restores the other rows
after every step to the same effect).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from d3mfmt.generator import placeholder_prompt


@dataclass(frozen=True)
class InversionSettings:
    steps: int | None = None  # None: the model's default (builder/defaults.py)
    lr: float | None = None
    batch: int | None = None
    n_vectors: int = 1
    weight_decay: float = 0.0
    generic_word: str = "object"  # initialiser when the tokenizer does not know the class name


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


def initial_vector(pipe, class_name: str, generic_word: str) -> tuple[torch.Tensor, str]:
    """The class name's token embedding if it is one known token, else the generic word's (mean over its tokens)."""
    tok, table = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = tok(class_name, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return table[ids[0]].float(), class_name
    ids = tok(generic_word, add_special_tokens=False).input_ids
    return table[ids].float().mean(dim=0), generic_word


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Images in [0, 1] -> scaled VAE latents (posterior means)."""
    vae = pipe.vae
    out = []
    for chunk in images.split(batch):
        x = chunk.to(vae.device, vae.dtype) * 2 - 1
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out).float()


def invert_class_token(pipe, collages: torch.Tensor, class_name: str, template: str, placeholder: str,
                       settings: InversionSettings, g: torch.Generator, log=None) -> tuple[np.ndarray, list[float]]:
    """Learn ``[n_vectors, D]`` so the frozen model renders ``collages`` from the template prompt.

    Returns:
        (the vectors as float32 numpy, mean loss of each tenth of the run).
    """
    from diffusers import DDPMScheduler

    device = pipe.unet.device
    # 1. fixed inputs: latents of the class's collages, the prompt's token ids
    latents = encode_latents(pipe, collages)
    ids, slots = placeholder_prompt(pipe, template, placeholder, settings.n_vectors)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_sched.config.prediction_type
    # 2. the only trainable tensor: the slot rows, initialised from a real word
    init, init_word = initial_vector(pipe, class_name, settings.generic_word)
    slot_module = SlotEmbedding(pipe.text_encoder.get_input_embeddings(), slots, init.expand(settings.n_vectors, -1))
    opt = torch.optim.AdamW([slot_module.vectors], lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    losses = []
    # 3. noise-prediction MSE over random collages and timesteps
    with swapped_token_embedding(pipe.text_encoder, slot_module):
        for _ in range(settings.steps):
            pick = torch.randint(len(latents), (settings.batch,), generator=g)
            z0 = latents[pick].to(device)
            noise = torch.randn(z0.shape, generator=g).to(device)
            t = torch.randint(noise_sched.config.num_train_timesteps, (settings.batch,), generator=g).to(device)
            zt = noise_sched.add_noise(z0, noise, t)
            target = noise if prediction == "epsilon" else noise_sched.get_velocity(z0, noise, t)
            with autocast:
                cond = pipe.text_encoder(ids.expand(settings.batch, -1))[0]
                pred = pipe.unet(zt.to(pipe.unet.dtype), t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred.float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    tenth = max(1, len(losses) // 10)
    curve = [float(np.mean(losses[i : i + tenth])) for i in range(0, len(losses), tenth)]
    if log:
        log(f"init {init_word!r}, " + (f"loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "no inversion steps"))
    return slot_module.vectors.detach().cpu().numpy().astype(np.float32), curve
