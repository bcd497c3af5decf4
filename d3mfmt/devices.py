"""Which device renders: the default, and one check called by every entry point before any model loads."""

from __future__ import annotations

import os

import torch

from .errors import D3MError

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")  # torch device types a pipeline can render on


def default_device(env=os.environ) -> str:
    """The rendering device when none is given: ``"cuda:LOCAL_RANK"`` under a launcher, ``"cuda"``, or ``"cpu"``.

    torchrun, accelerate and deepspeed set ``LOCAL_RANK`` in every process; a
    plain ``"cuda"`` would mean GPU 0 on every rank unless the script called
    ``torch.cuda.set_device``. With one visible GPU (a launcher that sets
    ``CUDA_VISIBLE_DEVICES`` per process) that GPU is the rank's, whatever
    ``LOCAL_RANK`` says.
    """
    if not torch.cuda.is_available():
        return "cpu"
    text = env.get("LOCAL_RANK")
    if text is None:
        return "cuda"
    if not text.strip().isdigit():
        raise D3MError(f"LOCAL_RANK must be a non-negative integer, got {text!r}; fix the launcher's environment "
                       "or pass RenderOptions(device=...)")
    local_rank, count = int(text), torch.cuda.device_count()
    if count == 1:
        return "cuda:0"
    if local_rank >= count:
        raise D3MError(f"LOCAL_RANK={local_rank}, but this process sees {count} CUDA devices (0..{count - 1}); "
                       "pass RenderOptions(device='cuda:N') or launch one process per visible GPU")
    return f"cuda:{local_rank}"


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
