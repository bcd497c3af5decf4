"""From finished class checkpoints to the archive: manifest, join, write (last), merge, summary.

One work directory (a whole build) or several (the shards of one build) hold a
checkpoint per class; :func:`join_classes` joins them, in class order, into the
archive's bytes (every checkpoint checked first: builder/workdir.py), and
:func:`write_build` writes them last, after the summary, through one atomic
write (temporary file, then rename): an archive is either complete and valid
or absent, and a failure leaves the file a user had at ``-o`` as it was. :func:`enforce_min_agreement` is the one ``--min-agreement``
rule, applied once, when the archive is written (at the end of a single run, or
at the merge of a sharded one); a shard only reports its classes below it
(:func:`below_min_agreement`), so one bad class never stops the other ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import d3mfmt
from d3mfmt import ClassInfo, D3MError, DatasetInfo, EmbeddingInfo, LabelEncoding, Manifest, SourceInfo, TeacherInfo
from d3mfmt.files import write_atomic
from d3mfmt.manifest import generator_from_dict
from d3mfmt.terminal import printable

from .buildinfo import agreement_info
from .guards import archive_warnings, regenerated_precision
from .labeloptions import fit_labels, recorded_labels
from .settings import check_min_agreement
from .workdir import REBUILD_CLASS, SETTINGS_FILE, Workdir, check_output_path, label_flags


SHOWN_CLASSES = 20  # classes named in a --min-agreement message


@dataclass(frozen=True)
class BuildResult:
    """What an action made: the archive (None for a shard of a larger build) and its summary lines."""

    out: Path | None
    archive: d3mfmt.Archive | None
    summary: list[str]


def class_labels(classes) -> list[str]:
    """How messages name classes: ``'name'``, or ``id 'name'`` when they differ (names may repeat: ImageNet's do)."""
    pairs = [(c["id"], c["name"]) if isinstance(c, dict) else (c.id, c.name) for c in classes]
    return [repr(name) if cid == name else f"{cid} {name!r}" for cid, name in pairs]


def _below(labels: list[str], metas: list[dict], min_agreement: float) -> list[tuple[str, dict]]:
    return [(label, m) for label, m in zip(labels, metas) if m["regenerated"] < min_agreement]


def _shown(below: list[tuple[str, dict]], limit: int = SHOWN_CLASSES) -> str:
    """``'name' 12% (real 100%), ...`` for at most ``limit`` classes, then how many more."""
    text = ", ".join(f"{label} {100 * m['regenerated']:.0f}%" + (
        "" if m.get("real_agreement") is None else f" (real {100 * m['real_agreement']:.0f}%)")
        for label, m in below[:limit])
    return printable(text + (f" and {len(below) - limit} more" if len(below) > limit else ""))


def below_min_agreement(labels: list[str], metas: list[dict], min_agreement: float | None) -> list[str]:
    """A shard's report: its classes below ``--min-agreement`` (recorded; the merge refuses them), or no lines."""
    below = [] if min_agreement is None else _below(labels, metas, min_agreement)
    if not below:
        return []
    return [f"  {len(below)} of this shard's {len(labels)} classes are below --min-agreement {min_agreement:g}: "
            f"{_shown(below)}; they are recorded, and the merge with --min-agreement will refuse them"]


def enforce_min_agreement(labels: list[str], metas: list[dict], min_agreement: float | None,
                          workdir: Path | None = None) -> None:
    """The one ``--min-agreement`` rule, applied once, when an archive is written (a build or a merge).

    D3MError listing every class whose teacher agreement on regenerated patches is below it
    (the first :data:`SHOWN_CLASSES` by name), and what to do.

    Args:
        labels: the classes as messages name them (:func:`class_labels`); ``metas`` their checkpoint
            metadata, in the same order.
        workdir: where the finished classes stay (named in the message).
    """
    if min_agreement is None:
        return
    below = _below(labels, metas, min_agreement)
    if not below:
        return
    kept = "" if workdir is None else f" (every class stays finished in {workdir})"
    accept = "" if workdir is None else f" (`d3m-build merge {workdir} -o OUT` without --min-agreement)"
    raise D3MError(f"teacher agreement on regenerated patches is below --min-agreement {min_agreement:g} for "
                   f"{len(below)} of {len(labels)} classes: {_shown(below)}; the model does not render them the way "
                   f"the teacher sees them. No archive was written{kept}. Use a model that covers this data, or "
                   f"accept these classes by writing the archive without --min-agreement (or a lower value){accept}")


def archive_manifest(record: dict, labels: LabelEncoding, name: str, n_vectors: int, dim: int,
                     teacher_accuracy: float | None = None, build_info: dict | None = None) -> Manifest:
    """The manifest a work directory's record turns into (members are filled in by the writer)."""
    s = record["settings"]
    classes = tuple(ClassInfo(**c) for c in record["classes"])
    return Manifest(
        dataset=DatasetInfo(name, classes, int(s["ipc"]), int(s["grid"]), SourceInfo(**record["source"])),
        generator=generator_from_dict(record["generator"]),
        embeddings=EmbeddingInfo(n_vectors, dim, "float16"),
        labels=fit_labels(labels, len(classes), s["temperature"]),
        teacher=TeacherInfo(record["teacher"]["name"], record["teacher"]["identity"], teacher_accuracy),
        fingerprint_size=int(s["fingerprint_size"]),
        build={"tool": f"d3mfmt {d3mfmt.__version__}", "settings": s, **(build_info or {})},
    )


def finished_classes(workdirs: list[Path]) -> tuple[dict, list[tuple[dict, dict]], Path]:
    """(the build's record, (tensors, meta) per class in class order, the first work directory).

    Raises D3MError if a work directory is named twice, the work directories come from different
    builds or were started with other label options, or a class is not built yet.
    """
    seen = {}
    for p in workdirs:
        key = Path(p).resolve()
        if key in seen:
            raise D3MError(f"work directory {p} is named twice (also as {seen[key]}); name each shard's once")
        seen[key] = p
    wds = [Workdir(p, create=False) for p in workdirs]
    record = wds[0].record()
    for wd in wds[1:]:
        if wd.record() != record:
            raise D3MError(f"{wd.path} was built with other settings than {wds[0].path}; only shards of one build merge")
        if wd.labels() is not None and wds[0].labels() is not None and wd.labels() != wds[0].labels():
            raise D3MError(f"{wd.path} was built with label options {label_flags(wd.labels())}, {wds[0].path} with "
                           f"{label_flags(wds[0].labels())}; only shards of one build merge")
    num_classes = len(record["classes"])
    owner = {c: next((wd for wd in wds if wd.done(c)), None) for c in range(num_classes)}
    missing = [c for c, wd in owner.items() if wd is None]
    if missing:
        raise D3MError(f"classes {missing[:10]}{'...' if len(missing) > 10 else ''} are not built yet; "
                       "run (or finish) the shards that own them, then merge again")
    return record, [owner[c].load_class(c) for c in range(num_classes)], wds[0].path


@dataclass(frozen=True)
class JoinedArchive:
    """Every finished class joined into one archive, serialised but not yet written."""

    archive: d3mfmt.Archive
    data: bytes  # the archive's bytes
    metas: list[dict]  # every class's checkpoint metadata, in class order


def join_classes(workdirs: list[Path], labels: LabelEncoding | None, name: str, teacher_accuracy: float | None = None,
                 min_agreement: float | None = None) -> JoinedArchive:
    """Join finished class checkpoints (from one or several shards) into archive bytes; write nothing.

    Raises D3MError if a class is missing or damaged, or if ``min_agreement`` is given and a
    class's teacher agreement on regenerated patches is below it. ``labels`` None: the build's.
    """
    # 1. every class of one build, each above the agreement floor
    labels = recorded_labels(list(workdirs), labels)
    record, parts, first = finished_classes(workdirs)
    metas = [m for _, m in parts]
    enforce_min_agreement(class_labels(record["classes"]), metas, min_agreement,
                          first if len(workdirs) == 1 else None)
    # 2. one embedding shape (one model), then the manifest from the record
    widths = {t["embedding"].shape for t, _ in parts}
    if len(widths) > 1:
        raise D3MError(f"class checkpoints hold embeddings of shapes {sorted(widths)}; they come from different "
                       f"models: {REBUILD_CLASS}")
    emb = np.stack([t["embedding"] for t, _ in parts])
    probs = [t["probs"] for t, _ in parts]
    try:
        manifest = archive_manifest(record, labels, name, emb.shape[1], emb.shape[2], teacher_accuracy,
                                    agreement_info(record["classes"], metas, regenerated_precision(probs)))
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited record: the manifest's own checks raise D3MError
        raise D3MError(f"{first / SETTINGS_FILE} is damaged ({exc!r}); build again into a new --workdir") from None
    # 3. tensors and labels through d3mfmt's writer, in memory
    archive = d3mfmt.Archive(
        manifest,
        embeddings=emb.astype(np.float16),
        seeds=np.stack([t["seeds"] for t, _ in parts]),
        labels=d3mfmt.encode_labels(np.concatenate(probs), manifest.labels),
        fingerprints=np.stack([t["fingerprints"] for t, _ in parts]),
    )
    return JoinedArchive(archive, d3mfmt.save(archive), metas)


def write_archive(workdirs: list[Path], out: Path, labels: LabelEncoding | None, name: str,
                  teacher_accuracy: float | None = None, min_agreement: float | None = None) -> d3mfmt.Archive:
    """Join finished class checkpoints into ``out`` (:func:`join_classes`, then one atomic write, last)."""
    check_output_path(out)
    joined = join_classes(workdirs, labels, name, teacher_accuracy, min_agreement)
    write_atomic(out, joined.data)
    return joined.archive


def write_build(workdirs: list[Path], out: Path, labels: LabelEncoding | None, seconds: float | None = None,
                teacher_accuracy: float | None = None, min_agreement: float | None = None) -> BuildResult:
    """Join, summarise, then write ``out`` last: a failure before leaves no new archive and the old one as it was."""
    out = Path(out)
    check_output_path(out)
    joined = join_classes(workdirs, labels, out.name.removesuffix(".d3m"), teacher_accuracy, min_agreement)
    summary = summarize_build(out, joined, seconds)
    write_atomic(out, joined.data)
    return BuildResult(out, joined.archive, summary)


def merge_archives(workdirs: list[Path], out: Path, *, labels: LabelEncoding | None = None,
                   min_agreement: float | None = None) -> BuildResult:
    """Write ``out`` from the finished work directories of every shard of one build (``labels`` None: the build's)."""
    if not workdirs:
        raise D3MError("merge needs at least one work directory")
    check_min_agreement(min_agreement)
    return write_build(list(workdirs), out, labels, min_agreement=min_agreement)


def summarize_build(out: Path, joined: JoinedArchive, seconds: float | None) -> list[str]:
    """Closing summary: seconds per stage, bytes per member, teacher agreement and the classes it flags."""
    from d3mfmt.container import read_zip

    archive, metas = joined.archive, joined.metas
    classes = archive.manifest.dataset.classes
    stages = {k: sum(m["seconds"].get(k, 0) for m in metas) for k in metas[0]["seconds"]}
    lines = [f"built {out}" + (f" in {seconds:.0f}s (this run; resumed classes excluded)" if seconds is not None else "")]
    lines += [f"  stage {k:<8}{v:8.1f}s (all classes)" for k, v in stages.items()]
    for member, payload in read_zip(joined.data).items():
        lines.append(f"  {member:<22}{len(payload):>10,} bytes")
    lines.append(f"  file                  {len(joined.data):>10,} bytes")
    real = [m.get("real_agreement") for m in metas]
    regen = [m["regenerated"] for m in metas]
    known = [r for r in real if r is not None]
    lines.append(f"  teacher top-1 = class on regenerated patches: {100 * np.mean(regen):.1f}%"
                 + (f" (on the selected real patches: {100 * np.mean(known):.1f}%)" if known else ""))
    if archive.manifest.teacher.accuracy is not None:
        lines.append(f"  teacher accuracy on held-out real images: {100 * archive.manifest.teacher.accuracy:.1f}%")
    precision = [archive.manifest.build["agreement"][c.id].get("precision") for c in classes]
    lines += archive_warnings(classes, real, regen, precision)
    return lines
