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
the whole schedule. The vector is evaluated on it at step 0 (the initialiser,
builder/initialisers.py) and every ``val_every`` steps. Without a render score
the lowest loss is kept, so inversion never returns a vector that denoises the
class's collages worse than its initialiser. A build also renders the
candidates (the initialiser, every ``render_every`` steps, the last and the
lowest-loss vector) and keeps the one the teacher recognises most often
(builder/keepbest.py): a lower denoising loss did not mean better renders.

Norm control (``norm``, ``norm_pull``): learned embeddings that drift to large
norms are a known failure of textual inversion under classifier-free guidance;
the norm can be held at the initialiser's or the vocabulary's mean (the
direction is optimised), or pulled toward the initialiser by an L2 term. The
kept vector's norm is logged and recorded against the vocabulary's mean.

Numerics (builder/precision.py): the vectors and AdamW's state are float32; the
frozen model runs in the render dtype (``--dtype``) under autocast, with a
dynamic loss scale in fp16 (an overflowing step is skipped and counted).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from d3mfmt.prompts import placeholder_prompt
from d3mfmt.terminal import printable

from .denoising import (SlotEmbedding, ValidationSet, denoising_loss, draw_validation_set, encode_latents,
                        sample_timesteps, swapped_token_embedding, validation_loss)
from .initialisers import initial_vectors, mean_token_norm
from .keepbest import Candidate, choose_candidate
from .precision import loss_scaler, scaled_step

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
    render_every: int = 50  # candidates for render-scored keep-best every N steps (0: keep the lowest val loss)
    render_images: int = 3  # images rendered per candidate (from seeds the archive does not use)
    norm: str = "free"  # the vectors' norm: "free", "init" (held at the initialiser's), "vocab" (the mean token's)
    norm_pull: float = 0.0  # weight of an L2 pull toward the initialiser (squared distance / mean token norm^2)


TIMESTEP_SAMPLING = ("uniform", "stratified")
NORM_CONTROL = ("free", "init", "vocab")


def log_inversion(class_name: str, init_word: str, stats: dict, curve: list[float], steps: int) -> None:
    """One log line per class: the initialiser, and validation loss, render score and norm, init -> kept."""
    init, best = stats["val_loss_init"], stats["val_loss_best"]
    change = 100 * (best - init) / init if init else 0.0
    render = (f", renders {100 * stats['render_init']:.0f}% -> {100 * stats['render_best']:.0f}% "
              f"({stats['render_seconds']:.1f}s)" if "render_best" in stats else "")
    log.info("class %s: init %r, val loss %.4f -> %.4f (%+.1f%%, kept step %d of %d; validation %.1fs)%s, "
             "norm %.3f -> %.3f (vocabulary mean %.3f)%s", printable(class_name), init_word, init, best, change,
             stats["best_step"], steps, stats["val_seconds"], render, stats["norm_init"], stats["norm_best"],
             stats["vocab_norm"], f", train loss {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "")


@dataclass
class InversionRun:
    """What one run leaves: the candidates it would keep, its curves, its costs."""

    candidates: list = field(default_factory=list)  # keepbest.Candidate: init, every render_every steps, last
    val_best: int = 0  # index in candidates of the lowest validation loss
    val_curve: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    val_seconds: float = 0.0
    skipped: int = 0


def hold_norm(vectors: torch.Tensor, init: torch.Tensor, how: str, vocab_norm: float) -> None:
    """Rescale each slot vector in place to its target norm ("init": the initialiser's, "vocab": the mean token's)."""
    if how == "free":
        return
    target = init.norm(dim=1, keepdim=True) if how == "init" else torch.full_like(vectors[:, :1], vocab_norm)
    with torch.no_grad():
        vectors.mul_(target / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12))


def train_vectors(pipe, latents, ids, val: ValidationSet, noise_sched, slot_module, settings: InversionSettings,
                  g: torch.Generator) -> InversionRun:
    """Steps 3-4 of :func:`invert_class_token`: AdamW on the slot vectors, validated, candidates collected."""
    init, vocab = slot_module.vectors.detach().clone(), mean_token_norm(pipe)
    opt = torch.optim.AdamW([slot_module.vectors], lr=settings.lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay)
    scaler, run = loss_scaler(pipe), InversionRun()  # fp16: scaled loss, inf/NaN steps skipped (builder/precision.py)
    num_t, every = noise_sched.config.num_train_timesteps, settings.render_every or settings.steps + 1
    lowest = None  # the candidate with the lowest validation loss so far
    for step in range(settings.steps + 1):
        if step:  # step 0 scores the initialiser: the vector to beat
            pick = torch.randint(len(latents), (settings.batch,), generator=g)
            noise = torch.randn(latents[pick].shape, generator=g)
            t = sample_timesteps(settings.batch, num_t, settings.timesteps, g)
            loss = denoising_loss(pipe, ids, latents[pick], t, noise, noise_sched)
            if settings.norm_pull:  # L2 pull toward the initialiser, relative to the vocabulary's token norm
                loss = loss + settings.norm_pull * (slot_module.vectors - init).pow(2).sum(1).mean() / vocab**2
            run.skipped += not scaled_step(loss, opt, scaler)
            hold_norm(slot_module.vectors, init, settings.norm, vocab)
            run.losses.append(float(loss.detach()))
        if step % settings.val_every and step % every and step != settings.steps:
            continue
        t0 = time.perf_counter()
        current = validation_loss(pipe, ids, val, noise_sched, settings.batch)
        run.val_seconds += time.perf_counter() - t0
        run.val_curve.append((step, current))
        cand = Candidate(step, current, slot_module.vectors.detach().cpu().numpy().astype(np.float32))
        if step % every == 0 or step == settings.steps:
            run.candidates.append(cand)
        if lowest is None or current < lowest.val_loss:
            lowest = cand
    if all(cand.step != lowest.step for cand in run.candidates):
        run.candidates.append(lowest)  # the lowest validation loss is always a candidate
    run.val_best = next(k for k, cand in enumerate(run.candidates) if cand.step == lowest.step)
    return run


def invert_class_token(pipe, collages: torch.Tensor, class_name: str, template: str, placeholder: str,
                       settings: InversionSettings, g: torch.Generator, val_g: torch.Generator,
                       render_score=None) -> tuple[np.ndarray, list[float], dict]:
    """Learn ``[n_vectors, D]`` so the frozen model renders ``collages`` from the template prompt.

    Logs (logger ``d3m-build``) the initialising word, the validation loss and the render score it reached.

    Args:
        g: the training stream (batches, timesteps, noise).
        val_g: draws the fixed validation set only, so validation never changes the training stream.
        render_score: candidate vectors -> render score each (builder/keepbest.py); ``None``: keep the
            lowest validation loss.

    Returns:
        (the kept vectors as float32 numpy, mean training loss of each tenth of the run, stats:
        ``init_words``; ``val_loss_init``, ``val_loss_best`` (the kept vector's), ``best_step`` (0: the
        initialiser), ``val_curve`` ((step, loss) pairs), ``val_seconds``; with ``render_score``:
        ``render_init``, ``render_best``, ``render_curve``, ``render_seconds``; ``skipped_steps`` (fp16
        overflow); ``norm_init``, ``norm_best`` (mean L2 over slots), ``vocab_norm`` (mean token norm)).
    """
    from diffusers import DDPMScheduler

    # 1. fixed inputs: latents of the class's collages, the prompt's token ids, the validation triples
    latents = encode_latents(pipe, collages)
    ids, slots = placeholder_prompt(pipe, template, placeholder, settings.n_vectors)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    val = draw_validation_set(latents, settings.val_size, noise_sched.config.num_train_timesteps, val_g)
    # 2. the only trainable tensor: the slot rows, initialised from the class's name (builder/initialisers.py)
    init, init_words = initial_vectors(pipe, class_name, settings.n_vectors, settings.generic_word)
    slot_module = SlotEmbedding(pipe.text_encoder.get_input_embeddings(), slots, init)
    # 3-4. train; validate every val_every steps; collect the candidates
    with swapped_token_embedding(pipe.text_encoder, slot_module):
        run = train_vectors(pipe, latents, ids, val, noise_sched, slot_module, settings, g)
    stats = {"init_words": init_words, "val_loss_init": run.candidates[0].val_loss, "val_curve": run.val_curve,
             "val_seconds": run.val_seconds, "skipped_steps": run.skipped}
    # 5. keep the candidate that renders best (ties: lower validation loss), or the lowest validation loss
    keep = run.val_best
    if render_score is not None and settings.steps > 0:
        t0 = time.perf_counter()
        scores = render_score([cand.vectors for cand in run.candidates])
        keep = choose_candidate(run.candidates, scores)
        stats.update(render_init=scores[0], render_best=scores[keep], render_seconds=time.perf_counter() - t0,
                     render_curve=[(cand.step, score) for cand, score in zip(run.candidates, scores)])
    kept = run.candidates[keep]
    stats.update(val_loss_best=kept.val_loss, best_step=kept.step, norm_init=float(init.norm(dim=1).mean()),
                 norm_best=float(np.linalg.norm(kept.vectors, axis=1).mean()), vocab_norm=mean_token_norm(pipe))
    tenth = max(1, len(run.losses) // 10)
    curve = [float(np.mean(run.losses[i : i + tenth])) for i in range(0, len(run.losses), tenth)]
    log_inversion(class_name, " ".join(init_words), stats, curve, settings.steps)
    return kept.vectors, curve, stats
