"""A teacher for ``d3m-build --teacher my_teachers:small_cnn_in100``, in plain torch (what ``make setup`` installs).

A teacher is a no-argument function returning a ``torch.nn.Module`` that maps
float images in [0, 1] (NCHW, at patch resolution: collage side / grid) to one
logit per class, in the archive's class order; the normalisation is inside the
module. Define the architecture your weights were trained with (here a small
CNN), and load the weights from a safetensors file (never a pickle).

Usage (copy this file next to your data, then):
    PYTHONPATH=. d3m-build train/ -o in100_ipc10.d3m --teacher my_teachers:small_cnn_in100 \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --revision <commit> --classes classes.txt
"""

import safetensors.torch
import torch
from torch import nn

WEIGHTS = "small_cnn_in100.safetensors"  # the trained weights (a state dict saved with safetensors.torch.save_file)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the statistics the teacher was trained with


class SmallCNN(nn.Module):
    """Three conv blocks, global pooling, one linear layer; ImageNet normalisation inside."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        blocks = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((images - self.mean) / self.std))


def small_cnn_in100() -> nn.Module:
    """The teacher ``--teacher my_teachers:small_cnn_in100`` loads: SmallCNN(100) with its trained weights."""
    net = SmallCNN(100)
    net.load_state_dict(safetensors.torch.load_file(WEIGHTS))
    return net
