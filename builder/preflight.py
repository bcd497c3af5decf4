"""The build's preflight, once per build: the data check, the file listing, the class-order matrix.

Before the first class, a build must know that every image it will read
decodes, the data's fingerprint (every file's path and size), and the
teacher's confusion matrix on a sample of every class (builder/guards.py). At
ImageNet scale that is 300k decodes, 1.28M stats and 32k more decodes; every
rank and every restart used to repeat them. Now one pass per class does all
three (the sample is the first :data:`guards.ORDER_SAMPLE` of the images the
check decodes anyway, on :data:`prefetch.DECODE_THREADS` threads), and the
result is stored as ``preflight.json`` in the work directory by the first
process that gets there (builder/once.py: an ``O_EXCL`` lock file; the others
wait), then reused by every other rank and every restart of the build.

The stored result is keyed by what it was computed from: the data folder, its
class list and every class folder's mtime (which changes when a file is added,
removed or renamed there; a file rewritten in place is not noticed), the
number of images read per class, the patch side and the teacher's weights.
Patch selection reads the images the preflight listed, so no class folder is
listed twice.

Example:
    >>> pre = run_preflight(source, teacher, side=32, limit=300, device="cpu", workdir=Path("out.d3m.work"))
    ... # doctest: +SKIP
    >>> pre.reused, pre.counts.shape                                                   # doctest: +SKIP
    (False, (10, 10))
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from d3mfmt import D3MError, SourceInfo
from d3mfmt.terminal import printable

from .guards import ORDER_SAMPLE, confusion_row
from .once import compute_once
from .teachers import TeacherError

log = logging.getLogger("d3m-build")

PREFLIGHT = "preflight"  # preflight.json (and preflight.lock while it is computed)
FORMAT = 1


@dataclass(frozen=True)
class Preflight:
    """What the preflight found, for every rank of the build."""

    source: SourceInfo  # the archive's source section (the data's fingerprint)
    files: list[list[str]] | None  # per class, the image files a build reads (None: in-memory data)
    counts: np.ndarray  # [C, C] teacher top-1 per class folder (guards.check_class_order)
    reused: bool  # True when another process (or an earlier run) computed it


def preflight_key(source, side: int, limit: int, teacher_id: str) -> dict:
    """What the preflight depends on; a stored preflight with another key is computed again."""
    return {"format": FORMAT, "data": source.data_key(), "max_images": limit, "side": side,
            "sample": ORDER_SAMPLE, "teacher": teacher_id}


def compute_preflight(source, teacher, side: int, limit: int, device: str, progress: bool = True) -> dict:
    """One pass over every class: list, decode the first ``limit`` images, classify the first ORDER_SAMPLE."""
    from tqdm.auto import tqdm

    num_classes = len(source.classes)
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    scans = []
    for c in tqdm(range(num_classes), desc="preflight", unit="class", disable=not progress):
        scan = source.scan(c, limit, side, ORDER_SAMPLE)
        try:
            counts[c] = confusion_row(teacher, scan.sample, num_classes, device)
        except TeacherError as exc:
            raise D3MError(f"class {printable(source.classes[c].name)!r} (preflight, on its real images): {exc}") from None
        scans.append(scan.without_sample())
    files = None if scans[0].files is None else [scan.files[:limit] for scan in scans]
    return {"source": asdict(source.info(scans)), "files": files, "counts": counts.tolist()}


def run_preflight(source, teacher, *, side: int, limit: int, teacher_id: str, device: str, workdir: Path,
                  progress: bool = True) -> Preflight:
    """The build's preflight: stored in ``workdir`` by the first process, reused by every other one.

    Raises D3MError (nothing stored) for a class without images or an image that does not decode.
    """
    start = time.perf_counter()
    key = preflight_key(source, side, limit, teacher_id)
    created = not Path(workdir).exists()
    try:
        value, reused = compute_once(Path(workdir), PREFLIGHT, key,
                                     lambda: compute_preflight(source, teacher, side, limit, device, progress))
    except D3MError:
        if created:  # bad data: leave no empty work directory behind (one another rank uses is not empty)
            with contextlib.suppress(OSError):
                os.rmdir(workdir)
        raise
    where = Path(workdir) / f"{PREFLIGHT}.json"
    pre = _parse(value, len(source.classes), where)
    if reused:
        log.info("preflight: reusing %s (data check, file listing and class-order matrix of this build); "
                 "no image decoded again", where)
    else:
        read = sum(len(f) for f in pre.files) if pre.files is not None else None
        log.info("preflight: %s classes checked%s, class-order matrix from up to %d images per class, in %.1fs; "
                 "stored in %s for every rank and restart of this build", len(source.classes),
                 "" if read is None else f" ({read} images decoded)", ORDER_SAMPLE, time.perf_counter() - start,
                 where)
    return Preflight(pre.source, pre.files, pre.counts, reused)


def _parse(value: dict, num_classes: int, where: Path) -> Preflight:
    """The stored value as a Preflight (written by :func:`compute_preflight`; D3MError if edited since)."""
    try:
        counts = np.asarray(value["counts"], dtype=np.int64).reshape(num_classes, num_classes)
        files = value["files"]
        if files is not None and (len(files) != num_classes or not all(
                isinstance(f, list) and all(isinstance(n, str) for n in f) for f in files)):
            raise ValueError("files must hold one list of names per class")
        return Preflight(SourceInfo(**value["source"]), files, counts, False)
    except (KeyError, TypeError, ValueError) as exc:
        raise D3MError(f"{where} is damaged ({str(exc)[:100]}); delete it and run the build again") from None
