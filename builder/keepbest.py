"""Keep the inverted vector that renders its class best, not only the one that denoises best.

Textual inversion lowers a denoising loss on the class's collages; the archive
is judged by what the vector *renders*, at the archive's guidance scale and
steps, which that loss does not see (classifier-free guidance amplifies the
difference between the conditional and unconditional predictions). On the
built-in model the two moved apart: the vector with the lowest validation loss
often rendered its class worse than the word it started from.

So the candidates along a run (the initialiser, the vector every
``render_every`` steps, the last one and the one with the lowest validation
loss) are rendered from ``render_images`` fixed seeds that the archive never
uses (a stream of their own, the archive's candidate seeds excluded), through
the consumer's renderer, with the vectors rounded to fp16 as the archive stores
them. The teacher labels the patches; the candidate whose patches it assigns to
the class most often is kept, ties broken by the lower validation loss, then
the earlier step. The initialiser is always a candidate, so on these renders
the stored vector never renders its class worse than its initialiser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from d3mfmt import GeneratorInfo, RenderOptions
from d3mfmt.generator import Regenerator

from .labelling import render_and_label

SCORING_STREAM = 3  # np.random.default_rng([seed, class, 3]): not the archive's seed stream ([seed, class])


@dataclass(frozen=True)
class Candidate:
    """One vector a run could keep: the step it was taken at and its validation loss."""

    step: int
    val_loss: float
    vectors: np.ndarray  # [n_vectors, D] float32


def scoring_seeds(base_seed: int, c: int, count: int, exclude: list[int]) -> list[int]:
    """``count`` render seeds for scoring class ``c``'s candidates, none of them in ``exclude``."""
    rng = np.random.default_rng([base_seed, c, SCORING_STREAM])
    taken, seeds = set(int(s) for s in exclude), []
    while len(seeds) < count:
        seed = int(rng.integers(0, 2**31 - 1))
        if seed not in taken:
            taken.add(seed)
            seeds.append(seed)
    return seeds


def render_scorer(gen: GeneratorInfo, teacher, target: int, seeds: list[int], grid: int,
                  render: RenderOptions) -> Callable[[list[np.ndarray]], list[float]]:
    """A function: candidate vectors -> the teacher's top-1 agreement with ``target`` on each one's renders."""

    def score(candidates: list[np.ndarray]) -> list[float]:
        stored = np.stack(candidates).astype(np.float16).astype(np.float32)  # what the archive would store
        regen = Regenerator(gen, stored, render)
        out = []
        for k in range(len(stored)):
            probs, _, _ = render_and_label(regen, k, seeds, teacher, grid, 1.0, None, render.device)
            out.append(float((probs.argmax(axis=1) == target).mean()))
        return out

    return score


def choose_candidate(candidates: list[Candidate], scores: list[float]) -> int:
    """Index of the candidate with the highest render score; ties: lower validation loss, then earlier step."""
    return min(range(len(candidates)), key=lambda k: (-scores[k], candidates[k].val_loss, candidates[k].step))
