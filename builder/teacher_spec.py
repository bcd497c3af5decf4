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
