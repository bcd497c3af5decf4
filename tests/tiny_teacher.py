"""A deterministic teacher and ImageFolder for builder tests: class c = the brightest channel c."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class ChannelTeacher(torch.nn.Module):
    """Logits = 8 x per-channel mean brightness: a fixed, sensible 3-class classifier."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(8.0), requires_grad=False)
        self.num_classes = num_classes

    def forward(self, x):
        return self.scale * x.mean(dim=(2, 3))[:, : self.num_classes]


def build_teacher():
    return ChannelTeacher(3)


def build_wide_teacher():
    """Wrong width on purpose: for the class-count mismatch test."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 5))


def make_imagefolder(root: Path, classes=("a_red", "b_green", "c_blue"), per_class: int = 6, side: int = 40) -> Path:
    """Noisy images whose class colour dominates, as PNG files."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (side, side, 3))
            pixels[..., c] += 120
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def build_permuted_teacher():
    """The right classifier with its logits in another order (blue, red, green): the class-order guard's case."""
    teacher = ChannelTeacher(3)
    return PermutedLogits(teacher, [2, 0, 1])


class PermutedLogits(torch.nn.Module):
    def __init__(self, inner, order):
        super().__init__()
        self.inner, self.order = inner, list(order)

    def forward(self, x):
        return self.inner(x)[:, self.order]


DIGITS = ("zero", "one", "two")


def build_digit_teacher():
    """The built-in mnist-cnn restricted to the digits 0, 1, 2 (for :func:`make_digit_folder`)."""
    from builder.teachers import load_teacher

    return FirstLogits(load_teacher("mnist-cnn"), len(DIGITS))


class FirstLogits(torch.nn.Module):
    def __init__(self, inner, n):
        super().__init__()
        self.inner, self.n = inner, n

    def forward(self, x):
        return self.inner(x)[:, : self.n]


def make_digit_folder(root: Path, per_class: int = 8) -> Path:
    """An ImageFolder of real MNIST train digits 0, 1, 2 (folders zero/, one/, two/) as 28-px PNG files."""
    from d3mfmt.mnist import load_mnist

    images, labels = load_mnist("train")
    for digit, name in enumerate(DIGITS):
        (root / name).mkdir(parents=True)
        for i, pixels in enumerate(images[labels == digit][:per_class]):
            Image.fromarray(pixels.astype(np.uint8)).convert("RGB").save(root / name / f"{i:03d}.png")
    return root


def build_teacher2():
    """:class:`ChannelTeacher` for two classes (red, green)."""
    return ChannelTeacher(2)


class FaultyTeacher(ChannelTeacher):
    """The channel teacher until its ``after``-th call, then one fault: NaN logits, a row short, or an error."""

    def __init__(self, fault: str, after: int = 4):  # 4 calls: the width probe and the 3-class preflight
        super().__init__(3)
        self.fault, self.after, self.calls = fault, after, 0

    def forward(self, x):
        self.calls += 1
        out = super().forward(x)
        if self.calls <= self.after:
            return out
        if self.fault == "nan":
            return out * float("nan")
        if self.fault == "short":
            return out[1:]
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def build_nan_teacher():
    return FaultyTeacher("nan")


def build_short_teacher():
    return FaultyTeacher("short")


def build_raising_teacher():
    return FaultyTeacher("raise")
