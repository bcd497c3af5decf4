"""Student networks for 32-px images (any side divisible by 4 for the ViT), written here without torchvision.

Every student maps float images ``[N, 3, H, W]`` in [0, 1] to logits ``[N, C]``.
Registry (plain dict, name -> ``factory(num_classes, side)``):

- ``convnet3``: the dataset-distillation ConvNet-3, 3 x [conv 3x3 - instance norm - ReLU - avg-pool 2], width 32;
- ``resnet8``: He et al.'s CIFAR ResNet with n = 1 (conv + 3 stages of one basic block, widths 16/32/64), BatchNorm;
- ``mlp``: two hidden layers of 256, ReLU;
- ``vit``: a small Vision Transformer, patch 4, width 64, depth 4, 4 heads, MLP 128, pre-norm, mean-pooled tokens.

``module:function`` names a user's factory taking ``num_classes``.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from d3mfmt import D3MError


def convnet3(num_classes: int, side: int = 32, width: int = 32) -> nn.Module:
    """ConvNet-3: three conv-instancenorm-relu-avgpool blocks, then a linear layer (any side: pooled to 4x4)."""
    layers, c_in = [], 3
    for _ in range(3):
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                   nn.AvgPool2d(2)]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, num_classes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet8(num_classes: int, side: int = 32, width: int = 16) -> nn.Module:
    """ResNet-8 for 32-px images: conv 3x3, three stages of one basic block (width, 2 width, 4 width), pool, linear."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


def mlp(num_classes: int, side: int = 32, hidden: int = 256) -> nn.Module:
    """Flatten, two ReLU hidden layers, linear."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


class ViT(nn.Module):
    """A small ViT: 4x4 patches -> tokens with learned positions -> pre-norm transformer -> mean token -> linear."""

    def __init__(self, num_classes: int, side: int = 32, patch: int = 4, dim: int = 64, depth: int = 4,
                 heads: int = 4):
        super().__init__()
        if side % patch:
            raise D3MError(f"the vit student needs an image side divisible by {patch}, got {side}")
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.position = nn.Parameter(torch.zeros(1, (side // patch) ** 2, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


STUDENTS = {"convnet3": convnet3, "resnet8": resnet8, "mlp": mlp, "vit": ViT}
STUDENT_NAMES = {"convnet3": "ConvNet-3", "resnet8": "ResNet-8", "mlp": "MLP", "vit": "ViT (patch 4)"}


def make_student(spec: str, num_classes: int, side: int) -> nn.Module:
    """A fresh student: a registered name, or ``module:function`` returning an ``nn.Module`` for ``num_classes``."""
    if spec in STUDENTS:
        return STUDENTS[spec](num_classes, side)
    if ":" not in spec:
        raise D3MError(f"unknown student {spec!r}; use one of {sorted(STUDENTS)} or 'module:function'")
    module_name, func_name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise D3MError(f"--student {spec!r}: cannot load it ({exc}); is the module on PYTHONPATH?") from None
    model = factory(num_classes)
    if not isinstance(model, nn.Module):
        raise D3MError(f"--student {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model
