"""``--teacher``: a built-in name or ``module:function``, its identity, its width check."""

from __future__ import annotations

import hashlib
import importlib

import torch

from d3mfmt import D3MError

from .teachers import TEACHERS, load_teacher


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
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise D3MError(f"--teacher {spec!r}: cannot import ({exc}); is the module on PYTHONPATH?") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise D3MError(f"--teacher {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model.eval().requires_grad_(False), spec


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
    out = model(torch.zeros(1, 3, side, side, device=device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise D3MError(
            f"the teacher returns logits of shape {tuple(out.shape)}, but the data has {num_classes} classes; "
            "use a teacher trained on these classes in this order (see --classes)"
        )
