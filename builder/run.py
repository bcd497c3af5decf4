"""One call per action: build an archive (or one shard of it), merge shards; each returns its summary.

What ``d3m-build`` runs, and what a script calls to do the same:

Example:
    >>> from builder.run import build_archive, label_encoding
    >>> from builder.build import demo_settings
    >>> from builder.sources import MnistSource
    >>> result = build_archive(MnistSource("train"), demo_settings(ipc=1), Path("mnist_ipc1.d3m"),
    ...                        labels=label_encoding())                           # doctest: +SKIP
    >>> print("\\n".join(result.summary))                                         # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import d3mfmt
from d3mfmt import D3MError, LabelEncoding

from .build import BuildSettings, build, check_settings, fit_labels, write_archive
from .guards import domain_message, domain_problems
from .workdir import Workdir


@dataclass
class BuildResult:
    """What an action made: the archive (None for a shard of a larger build) and its summary lines."""

    out: Path | None
    archive: d3mfmt.Archive | None
    summary: list[str]


def label_encoding(kind: str = "topk", k: int | None = None, values: str | None = None,
                   temperature: float = 1.0) -> LabelEncoding:
    """A label encoding from its parts; ``None`` takes the kind's default (topk: k 5, u8sqrt; dense: f16)."""
    default = LabelEncoding()
    if kind == "hard":
        if k not in (None, 1) or values is not None:
            raise D3MError("--labels hard stores one class index per patch: drop --k and --values")
        return LabelEncoding("hard", 1, None, temperature)
    if kind == "dense":
        if k is not None:
            raise D3MError("--labels dense stores every class: drop --k")
        return LabelEncoding("dense", None, values or "f16", temperature)
    return LabelEncoding(kind, default.k if k is None else k, values or default.values, temperature)


def merge_flags(labels: LabelEncoding, min_agreement: float | None) -> str:
    """The merge options that reproduce this build's label encoding (and threshold)."""
    flags = f" --labels {labels.kind}"
    if labels.kind == "topk":
        flags += f" --k {labels.k}"
    if labels.values is not None:
        flags += f" --values {labels.values}"
    return flags + ("" if min_agreement is None else f" --min-agreement {min_agreement:g}")


def check_labels(labels: LabelEncoding, num_classes: int, temperature: float) -> None:
    """A bad label option fails before the build, in the options' words."""
    try:
        fit_labels(labels, num_classes, temperature)
    except D3MError as exc:
        detail = str(exc).removeprefix("manifest.json: ")
        raise D3MError(f"label options (--labels, --k, --values) for {num_classes} classes: {detail}") from None


def build_archive(source, settings: BuildSettings, out: Path, *, labels: LabelEncoding,
                  workdir: Path | None = None, shard: tuple[int, int] = (0, 1), device: str | None = None,
                  check_order: bool = True, min_agreement: float | None = None, teacher_accuracy: float | None = None,
                  progress: bool = True) -> BuildResult:
    """Build ``source`` into the archive ``out`` (or, for a shard ``(i, n)`` with n > 1, into ``workdir`` only).

    Args:
        labels: how the soft labels are stored (:func:`label_encoding`).
        workdir: checkpoints, default ``OUT.work`` next to the archive.
        check_order / min_agreement: the two guards (builder/guards.py).
        teacher_accuracy: the teacher's held-out accuracy to record, if known.
    """
    out = Path(out)
    check_settings(settings)
    check_labels(labels, len(source.classes), settings.temperature)
    workdir = Path(workdir) if workdir is not None else out.with_name(out.name + ".work")
    start = time.perf_counter()
    wd = build(source, settings, workdir, shard=shard, device=device, progress=progress, out=out, check_order=check_order,
               order_suggestion=out.with_suffix(".classes.txt"), min_agreement=min_agreement)
    seconds = time.perf_counter() - start
    if shard[1] > 1:
        return BuildResult(None, None, [
            f"shard {shard[0]}/{shard[1]} done in {seconds:.0f}s; when every shard is done: "
            f"d3m-build merge {workdir} -o {out}{merge_flags(labels, min_agreement)}"])
    archive = write_archive([wd.path], out, labels, out.name.removesuffix(".d3m"), teacher_accuracy, min_agreement)
    return BuildResult(out, archive, summarize_build([wd], out, archive, seconds))


def merge_archives(workdirs: list[Path], out: Path, *, labels: LabelEncoding,
                   min_agreement: float | None = None) -> BuildResult:
    """Write ``out`` from the finished work directories of every shard of one build."""
    out = Path(out)
    if not workdirs:
        raise D3MError("merge needs at least one work directory")
    archive = write_archive(list(workdirs), out, labels, out.name.removesuffix(".d3m"), min_agreement=min_agreement)
    return BuildResult(out, archive, summarize_build([Workdir(p, create=False) for p in workdirs], out, archive, None))


def summarize_build(workdirs, out: Path, archive: d3mfmt.Archive, seconds: float | None) -> list[str]:
    """Closing summary: seconds per stage, bytes per member, teacher agreement and the classes it flags."""
    from d3mfmt.container import read_zip

    classes = archive.manifest.dataset.classes
    metas = []
    for c in range(len(classes)):
        wd = next(w for w in workdirs if w.done(c))
        metas.append(wd.load_class(c)[1])
    stages = {k: sum(m["seconds"][k] for m in metas) for k in metas[0]["seconds"]}
    lines = [f"built {out}" + (f" in {seconds:.0f}s (this run; resumed classes excluded)" if seconds is not None else "")]
    lines += [f"  stage {k:<8}{v:8.1f}s (all classes)" for k, v in stages.items()]
    for member, payload in read_zip(out.read_bytes()).items():
        lines.append(f"  {member:<22}{len(payload):>10,} bytes")
    lines.append(f"  file                  {out.stat().st_size:>10,} bytes")
    real = [m.get("real_agreement") for m in metas]
    regen = [m["accuracy"] for m in metas]
    known = [r for r in real if r is not None]
    lines.append(f"  teacher top-1 = class on regenerated patches: {100 * np.mean(regen):.1f}%"
                 + (f" (on the selected real patches: {100 * np.mean(known):.1f}%)" if known else ""))
    if archive.manifest.teacher.accuracy is not None:
        lines.append(f"  teacher accuracy on held-out real images: {100 * archive.manifest.teacher.accuracy:.1f}%")
    low = domain_problems(real, regen)
    if low:
        lines.append(f"  WARNING: {len(low)} of {len(classes)} classes render poorly for the teacher:")
        lines += [f"    {domain_message(classes[c].name, real[c], regen[c])}" for c in low]
    return lines
