"""``--shard``: which classes this process builds, read from the user or the launcher's environment.

Classes are independent, so a build splits into ``n`` shards by ``c % n == i``
(each shard into its own work directory), and ``d3m-build merge`` joins them.
This is how a large build spreads over many GPUs and machines under an
existing launcher (torchrun, accelerate, Slurm), not a home-made one.
"""

from __future__ import annotations

import os

import torch

from d3mfmt import D3MError
from d3mfmt.generator import default_device


def parse_shard(text: str, env=os.environ) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; ``"auto"`` reads the launcher's environment.

    ``auto`` understands torchrun and accelerate (RANK, WORLD_SIZE) and Slurm
    (SLURM_PROCID, SLURM_NTASKS; or SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT).
    """
    if text == "auto":
        for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                           ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank in env and size in env:
                text = f"{env[rank]}/{env[size]}"
                break
        else:
            return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise D3MError(f"--shard must look like i/n (e.g. 0/4) or be 'auto', got {text!r}") from None
    if not 0 <= i < n:
        raise D3MError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_classes(num_classes: int, shard: tuple[int, int]) -> list[int]:
    """The classes shard ``(i, n)`` owns: ``c % n == i``."""
    return [c for c in range(num_classes) if c % shard[1] == shard[0]]


def shard_device(env=os.environ) -> str:
    """cuda:LOCAL_RANK under a launcher with GPUs, else the default device."""
    if torch.cuda.is_available() and "LOCAL_RANK" in env:
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return default_device()
