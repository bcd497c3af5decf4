"""Seeds, random streams and soft labels, computed on exactly the pixels consumers regenerate.

Both go through ``d3mfmt.generator.Regenerator``, the code ``D3MDataset`` runs:
a collage is rendered from (embedding, seed), split row-major into patches,
and each patch gets the teacher's softmax at the label temperature.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from d3mfmt.generator import fingerprint, split_patches

RENDER_BATCH = 16  # images per render call


def class_generator(base_seed: int, c: int, stream: int) -> torch.Generator:
    """A torch generator fixed by (base seed, class, stream): shards agree with single runs."""
    return torch.Generator().manual_seed(int(np.random.default_rng([base_seed, c, stream]).integers(2**62)))


def class_seeds(base_seed: int, c: int, count: int) -> list[int]:
    """``count`` seeds for class ``c``, fixed by (base seed, class): shards agree with single runs."""
    rng = np.random.default_rng([base_seed, c])
    return rng.integers(0, 2**31 - 1, size=count, dtype=np.int64).tolist()


@torch.no_grad()
def teacher_probs(teacher, patches: torch.Tensor, temperature: float, device: str, batch: int = 256) -> torch.Tensor:
    """Teacher softmax(logits / T) for ``[M, 3, s, s]`` patches -> float64 ``[M, C]`` on the CPU."""
    out = []
    for chunk in patches.split(batch):
        logits = teacher(chunk.to(device)).double().cpu()
        out.append(F.softmax(logits / temperature, dim=1))
    return torch.cat(out)


def render_and_label(regen, c: int, seeds: list[int], teacher, grid: int, temperature: float,
                     fingerprint_size: int | None, device: str):
    """Render class ``c``'s images for ``seeds``; return (probs ``[n*g*g, C]``, fingerprints, patches)."""
    step = RENDER_BATCH
    images = torch.cat([regen.render(c, seeds[s : s + step]) for s in range(0, len(seeds), step)])
    patches = split_patches(images, grid).flatten(0, 1)
    probs = teacher_probs(teacher, patches, temperature, device)
    prints = None if fingerprint_size is None else fingerprint(images, fingerprint_size)
    return probs.numpy(), prints, patches


def choose_seeds(regen, render_index: int, target: int, candidates: list[int], ipc: int, teacher, grid: int,
                 device: str) -> list[int]:
    """Keep the ``ipc`` candidate seeds whose patches the teacher finds most clearly class ``target``.

    ``render_index`` is the class's row in ``regen``'s embeddings, ``target``
    its index in the teacher's output. Scored by the mean cross-entropy of
    ``target`` over the image's patches (lower is better), ties to the earlier
    candidate; the kept seeds stay in candidate order.
    """
    if len(candidates) == ipc:
        return candidates
    probs, _, _ = render_and_label(regen, render_index, candidates, teacher, grid, 1.0, None, device)
    ce = -np.log(np.maximum(probs[:, target], 1e-12)).reshape(len(candidates), grid * grid).mean(axis=1)
    order = np.argsort(ce, kind="stable")[:ipc]
    return [candidates[k] for k in sorted(order)]
