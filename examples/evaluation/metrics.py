"""Numbers computed from results: storage bytes, mean ± std, and DD-Ranking's HLR, IOR and LRS.

DD-Ranking (Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset
Distillation", arXiv 2505.13300; github.com/NUS-HPC-AI-Lab/DD-Ranking,
``doc/introduction.md`` and ``ddranking/metrics/hard_label.py``), accuracies as
fractions in [0, 1]:

- hard label recovery  ``HLR = acc(real, hard) - acc(syn, hard)``: the full
  training set and the distilled set, both with hard labels (lower is better);
- improvement over random  ``IOR = acc(syn, any) - acc(rdm, any)``: the
  distilled set and a random real subset of the same IPC under the same labels
  and protocol (higher is better);
- label-robust score  ``LRS = (exp(a) - exp(-1)) / (e - exp(-1))`` with
  ``a = w * IOR - (1 - w) * HLR`` and ``w = 0.5`` (DD-Ranking's default):
  ``a`` lies in [-1, 1], so LRS lies in [0, 1] (DD-Ranking prints it x 100).
"""

from __future__ import annotations

import io
import math

import numpy as np

LRS_WEIGHT = 0.5


def hard_label_recovery(full_hard: float, syn_hard: float) -> float:
    """HLR = acc(full data, hard labels) - acc(distilled, hard labels)."""
    return full_hard - syn_hard


def improvement_over_random(syn: float, random: float) -> float:
    """IOR = acc(distilled) - acc(random real subset of the same IPC), same labels and protocol."""
    return syn - random


def label_robust_score(hlr: float, ior: float, w: float = LRS_WEIGHT) -> float:
    """LRS = (e^a - e^-1) / (e - e^-1), a = w IOR - (1 - w) HLR."""
    a = w * ior - (1 - w) * hlr
    return (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))


def mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, as DD-Ranking reports)."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std())


def png_bytes(gray_uint8: np.ndarray) -> int:
    """Total size of ``[N, H, W]`` uint8 images as optimised 8-bit grayscale PNG files."""
    from PIL import Image

    total = 0
    for image in gray_uint8:
        buf = io.BytesIO()
        Image.fromarray(image, "L").save(buf, format="PNG", optimize=True)
        total += buf.tell()
    return total


def best_within(rows: list[dict], budget: int) -> dict | None:
    """The row with the highest mean accuracy among ``rows`` whose bytes fit ``budget``; None if none fits."""
    fitting = [r for r in rows if r["bytes"] <= budget]
    return max(fitting, key=lambda r: r["mean"]) if fitting else None
