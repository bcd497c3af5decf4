"""Which device renders: one check, called by every entry point before any model loads."""

from __future__ import annotations

import torch

from .errors import D3MError

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")  # torch device types a pipeline can render on


def check_device(device: str) -> None:
    """Refuse a device torch cannot parse, one that is not available here, or CUDA in a forked worker.

    Every entry point calls this before any model loads, so a typo or a missing
    GPU is one message instead of a traceback deep inside torch.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise D3MError(f"device {device!r} is not a rendering device; use one of {list(DEVICE_TYPES)}, "
                       "optionally with an index such as 'cuda:1'")
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda" and (torch.cuda._is_in_bad_fork() or (
        torch.utils.data.get_worker_info() is not None and torch.multiprocessing.get_start_method() == "fork"
    )):
        raise D3MError(
            "CUDA cannot be used in a forked DataLoader worker. Either render everything first with "
            "dataset.materialize() (workers then only read the cache), use num_workers=0, or pass "
            "multiprocessing_context='spawn' to the DataLoader"
        )
    backend = getattr(torch, parsed.type, None)
    available = hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise D3MError(f"device {device!r}: {parsed.type} is not available on this machine "
                       f"(torch {torch.__version__}); use 'cpu' or leave the device unset")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise D3MError(f"device {device!r}: this machine has {count} {parsed.type} device(s), "
                       f"numbered 0..{count - 1}")
