"""Teachers: the frozen classifiers that score patches and write soft labels.

A teacher is a ``torch.nn.Module`` that takes float images in ``[0, 1]``, NCHW,
and returns class logits ``[N, num_classes]``. Any normalisation happens inside
the module, so callers never need to know a teacher's statistics. ``--teacher``
names a built-in (:func:`load_teacher`) or a ``module:function``
(:func:`resolve_teacher`); :func:`check_teacher_width` refuses one whose logits
do not fit the data, :func:`teacher_identity` pins its weights in the manifest.

Registry (plain dict, name → :class:`TeacherSpec`):

- ``"mnist-cnn"``: a 72,666-parameter CNN for 32-px digit patches (white digit
  on black, as in MNIST and as the built-in ``d3m/tiny-mnist`` model renders
  them). Accepts 1 or 3 channels; with 3 it averages them first, because the
  diffusion model's VAE outputs RGB. Trained on the ``"train"`` split of
  :mod:`d3mfmt.mnist` by ``examples/train_builtin_models.py --only teacher``;
  fp16 weights in ``builder/weights/mnist-cnn.safetensors``, loaded as float32.

Example:
    >>> teacher = load_teacher("mnist-cnn")
    >>> teacher(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pathlib
from typing import Callable

import torch
from torch import nn

from d3mfmt.errors import D3MError

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"

# Pixel statistics of the train split padded to 32 px (measured; the recipe
# recomputes and prints them).
MNIST32_MEAN = 0.1002
MNIST32_STD = 0.2752


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3×3 conv → batch norm → ReLU, keeping the spatial size."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class MnistCNN(nn.Module):
    """Small VGG-style CNN for 32×32 digit patches; 10 logits out.

    Input: float ``[N, 1 or 3, H, W]`` in ``[0, 1]`` (H = W = 32 expected; the
    global pooling accepts other sizes). Normalisation is inside.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.register_buffer("mean", torch.tensor(MNIST32_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(MNIST32_STD), persistent=False)
        self.features = nn.Sequential(
            _conv_block(1, w), _conv_block(w, w), nn.MaxPool2d(2),          # 16×16
            _conv_block(w, 2 * w), _conv_block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8×8
            _conv_block(2 * w, 4 * w), _conv_block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise D3MError(
                f"mnist-cnn expects images [N, 1 or 3, H, W], got {tuple(images.shape)}"
            )
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        x = (images - self.mean) / self.std
        return self.classifier(self.features(x))


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """How to build a registered teacher and where its weights live."""

    build: Callable[[], nn.Module]
    weights: pathlib.Path


TEACHERS: dict[str, TeacherSpec] = {
    "mnist-cnn": TeacherSpec(
        build=MnistCNN,
        weights=WEIGHTS_DIR / "mnist-cnn.safetensors",
    ),
}


def load_teacher(name: str) -> nn.Module:
    """Build a registered teacher, load its weights, return it frozen.

    Args:
        name: a key of :data:`TEACHERS`, e.g. ``"mnist-cnn"``.

    Returns:
        The module in eval mode, float32, on the CPU, with gradients disabled.

    Example:
        >>> load_teacher("mnist-cnn").training
        False
    """
    from safetensors.torch import load_file

    if name not in TEACHERS:
        raise D3MError(f"unknown teacher {name!r}; known teachers: {sorted(TEACHERS)}")
    spec = TEACHERS[name]
    if not spec.weights.is_file():
        raise D3MError(
            f"teacher {name!r}: weights file {spec.weights} is missing; "
            "train it with `python examples/train_builtin_models.py --only teacher`"
        )
    model = spec.build()
    state = {k: v.float() for k, v in load_file(spec.weights).items()}
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def mnist_test_accuracy(model: nn.Module) -> float:
    """Top-1 accuracy of a 10-class digit teacher on the held-out built-in MNIST split."""
    from d3mfmt.mnist import load_mnist, to_rgb32

    x, y = load_mnist("test")
    pred = model(to_rgb32(x)).argmax(1).numpy()
    return round(float((pred == y).mean()), 4)


def resolve_teacher(spec: str) -> tuple[torch.nn.Module, str]:
    """(frozen eval-mode module, name) for a built-in teacher name or ``module:function``.

    A ``module:function`` callable takes no arguments and returns a
    ``torch.nn.Module`` mapping float images in [0, 1], NCHW, to one logit per
    class in the archive's class order (normalisation inside the module).
    """
    if spec in TEACHERS:
        return load_teacher(spec), spec
    if ":" not in spec:
        raise D3MError(f"unknown teacher {spec!r}; use a built-in ({sorted(TEACHERS)}) or 'module:function'")
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise D3MError(f"--teacher {spec!r}: cannot import ({exc}); is the module on PYTHONPATH?") from None
    except Exception as exc:  # a syntax error or a failure while the user's module runs
        raise D3MError(f"--teacher {spec!r}: importing {module_name!r} failed: {_describe(exc)}; "
                       "fix the module (run `python -c 'import " + module_name + "'` to see where)") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise D3MError(f"--teacher {spec!r}: module {module_name!r} has no function {func_name!r}")
    try:
        model = factory()
    except Exception as exc:
        raise D3MError(f"--teacher {spec!r}: the factory raised {_describe(exc)}; "
                       "it must take no arguments and return a torch.nn.Module") from None
    if not isinstance(model, torch.nn.Module):
        raise D3MError(f"--teacher {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model.eval().requires_grad_(False), spec


def _describe(exc: BaseException) -> str:
    """``TypeName: message`` on one line, for an error from user code."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def teacher_identity(model: torch.nn.Module) -> str:
    """``sha256:`` over the sorted state-dict names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


@torch.no_grad()
def check_teacher_width(model: torch.nn.Module, num_classes: int, side: int, device: str) -> None:
    """Refuse a teacher whose logits do not have one entry per archive class."""
    try:
        out = model(torch.zeros(1, 3, side, side, device=device))
    except Exception as exc:
        raise D3MError(
            f"the teacher fails on a batch of shape (1, 3, {side}, {side}): {_describe(exc)}; it must take RGB "
            "images in [0, 1], NCHW (convert inside the module if it expects other input)"
        ) from None
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a {out.dtype} tensor"
        raise D3MError(f"the teacher returns {got}, expected one float tensor of logits "
                       "[batch, classes]; wrap it in a module that returns only the logits")
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise D3MError(
            f"the teacher returns logits of shape {tuple(out.shape)}, but the data has {num_classes} classes; "
            "use a teacher trained on these classes in this order (see --classes)"
        )


class TeacherError(D3MError):
    """A teacher call raised, or returned logits a build cannot use (the build names the class)."""


def logits_problem(out, rows: int, num_classes: int) -> str | None:
    """What is wrong with one batch's logits, or None: one finite float row of ``num_classes`` per image."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a {out.dtype} tensor"
        return f"returned {got}, expected one float tensor of logits [batch, classes]"
    if out.ndim != 2 or out.shape[0] != rows or out.shape[1] != num_classes:
        return (f"returned logits of shape {tuple(out.shape)} for {rows} images, expected ({rows}, {num_classes}): "
                "one row per image, one logit per class")
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        bad = int((~finite).any(dim=1).sum())
        return f"returned NaN or infinite logits for {bad} of {rows} images"
    return None


class CheckedTeacher(nn.Module):
    """The build's teacher with every call checked (:func:`logits_problem`); a failure is a :class:`TeacherError`.

    So a teacher that raises mid-run, returns a wrong shape or NaN/Inf logits stops the build at
    the batch where it happens, before anything computed from those logits is stored.
    """

    def __init__(self, model: nn.Module, name: str, num_classes: int):
        super().__init__()
        self.model, self.name, self.num_classes = model, name, num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        try:
            out = self.model(images)
        except Exception as exc:  # the user's code: any error, named
            raise TeacherError(f"the teacher {self.name!r} raised {_describe(exc)} on a batch of shape "
                               f"{tuple(images.shape)}; fix the teacher (it must map any batch of RGB images "
                               "in [0, 1] to logits)") from None
        problem = logits_problem(out, len(images), self.num_classes)
        if problem:
            raise TeacherError(f"the teacher {self.name!r} {problem} (a batch of shape {tuple(images.shape)}); "
                               "fix the teacher: nothing computed from that batch was stored")
        return out
