"""From finished class checkpoints to the archive: label encoding, manifest, write, merge, summary.

One work directory (a whole build) or several (the shards of one build) hold a
checkpoint per class; :func:`write_archive` joins them, in class order, through
d3mfmt's writer (temporary file, then rename), so an archive is either complete
and valid or absent. :func:`enforce_min_agreement` is the one ``--min-agreement``
rule, applied once, when the archive is written (at the end of a single run, or
at the merge of a sharded one); a shard only reports its classes below it
(:func:`below_min_agreement`), so one bad class never stops the other ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import d3mfmt
from d3mfmt import ClassInfo, D3MError, DatasetInfo, EmbeddingInfo, LabelEncoding, Manifest, SourceInfo, TeacherInfo
from d3mfmt.manifest import generator_from_dict
from d3mfmt.terminal import printable

from .guards import domain_message, domain_problems
from .settings import check_min_agreement
from .workdir import REBUILD_CLASS, SETTINGS_FILE, Workdir, check_output_path


DENSE_VALUES = "f16"  # the dense encoding's value codec unless --values says otherwise
SHOWN_CLASSES = 20  # classes named in a --min-agreement message


@dataclass(frozen=True)
class BuildResult:
    """What an action made: the archive (None for a shard of a larger build) and its summary lines."""

    out: Path | None
    archive: d3mfmt.Archive | None
    summary: list[str]


def label_encoding(kind: str | None = None, k: int | None = None, values: str | None = None,
                   temperature: float = 1.0) -> LabelEncoding:
    """A label encoding from its parts; ``None`` takes the default (topk: k 5, u8sqrt; dense: f16)."""
    default = LabelEncoding()
    kind = default.kind if kind is None else kind
    if kind == "hard":
        if k not in (None, 1) or values is not None or temperature != 1.0:
            raise D3MError("--label-kind hard stores one class index per patch (the teacher's top-1, whatever "
                           "the temperature): drop --k, --values and --temperature")
        return LabelEncoding("hard", 1, None, temperature)
    if kind == "dense":
        if k is not None:
            raise D3MError("--label-kind dense stores every class: drop --k")
        return LabelEncoding("dense", None, values or DENSE_VALUES, temperature)
    return LabelEncoding(kind, default.k if k is None else k, values or default.values, temperature)


def fit_labels(labels: LabelEncoding, num_classes: int, temperature: float) -> LabelEncoding:
    """The requested encoding for ``num_classes`` (top-k capped at C), checked; raises D3MError."""
    if labels.kind == "topk" and isinstance(labels.k, int) and labels.k > num_classes:
        labels = replace(labels, k=num_classes)
    labels = replace(labels, temperature=float(temperature))
    labels.check(num_classes)
    return labels


def check_labels(labels: LabelEncoding, num_classes: int, temperature: float) -> None:
    """A bad label option fails before the build, in the options' words."""
    try:
        fit_labels(labels, num_classes, temperature)
    except D3MError as exc:
        detail = str(exc).removeprefix("manifest.json: ")
        raise D3MError(f"label options (--label-kind, --k, --values) for {num_classes} classes: {detail}") from None


def merge_flags(labels: LabelEncoding, min_agreement: float | None) -> str:
    """The merge options that reproduce this build's label encoding (and threshold)."""
    flags = f" --label-kind {labels.kind}"
    if labels.kind == "topk":
        flags += f" --k {labels.k}"
    if labels.values is not None:
        flags += f" --values {labels.values}"
    return flags + ("" if min_agreement is None else f" --min-agreement {min_agreement:g}")


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


INVERSION_RECORD = (  # what build.inversion records per class (only the keys a checkpoint has)
    "init_words",  # the words the initialiser was made from (builder/initialisers.py)
    "val_loss_init", "val_loss_best", "best_step",  # denoising loss on the fixed validation triples
    "render_init", "render_best",  # teacher agreement on the scoring renders (builder/keepbest.py)
    "norm_init", "norm_best", "vocab_norm",  # mean L2 norm over slots; the vocabulary's mean token norm
    "skipped_steps",  # fp16 steps skipped for an inf/NaN gradient
)


def inversion_record(stats: dict) -> dict:
    """One class's ``build.inversion`` entry: the :data:`INVERSION_RECORD` keys it has, floats to 6 places."""
    return {k: round(stats[k], 6) if isinstance(stats[k], float) else stats[k] for k in INVERSION_RECORD if k in stats}


def agreement_info(classes: list[dict], metas: list[dict]) -> dict:
    """Build info: the teacher's top-1 agreement with each class on real and on regenerated patches."""
    per_class = {}
    for c, m in zip(classes, metas):
        entry = {"regenerated": round(float(m["regenerated"]), 4)}
        if m.get("real_agreement") is not None:  # absent in checkpoints of older builds
            entry["real"] = round(float(m["real_agreement"]), 4)
        per_class[c["id"]] = entry
    # per class: textual inversion, initialiser -> vector kept (builder/inversion.py)
    inversion = {c["id"]: inversion_record(m["inversion"])
                 for c, m in zip(classes, metas) if "inversion" in m}  # absent in checkpoints of older builds
    return {
        "regenerated_patch_agreement": round(float(np.mean([m["regenerated"] for m in metas])), 6),
        "agreement": per_class,
        **({"inversion": inversion} if inversion else {}),
    }


def finished_classes(workdirs: list[Path]) -> tuple[dict, list[tuple[dict, dict]], Path]:
    """(the build's record, (tensors, meta) per class in class order, the first work directory).

    Raises D3MError if the work directories come from different builds or a class is not built yet.
    """
    wds = [Workdir(p, create=False) for p in workdirs]
    record = wds[0].record()
    for wd in wds[1:]:
        if wd.record() != record:
            raise D3MError(f"{wd.path} was built with other settings than {wds[0].path}; only shards of one build merge")
    num_classes = len(record["classes"])
    owner = {c: next((wd for wd in wds if wd.done(c)), None) for c in range(num_classes)}
    missing = [c for c, wd in owner.items() if wd is None]
    if missing:
        raise D3MError(f"classes {missing[:10]}{'...' if len(missing) > 10 else ''} are not built yet; "
                       "run (or finish) the shards that own them, then merge again")
    return record, [owner[c].load_class(c) for c in range(num_classes)], wds[0].path


def write_archive(workdirs: list[Path], out: Path, labels: LabelEncoding, name: str,
                  teacher_accuracy: float | None = None, min_agreement: float | None = None) -> d3mfmt.Archive:
    """Join finished class checkpoints (from one or several shards) into ``out``.

    Raises D3MError (and writes nothing) if a class is missing, or if ``min_agreement``
    is given and a class's teacher agreement on regenerated patches is below it.
    """
    # 1. the output folder, then every class of one build, each above the agreement floor
    check_output_path(out)
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
    try:
        manifest = archive_manifest(record, labels, name, emb.shape[1], emb.shape[2], teacher_accuracy,
                                    agreement_info(record["classes"], metas))
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited record: the manifest's own checks raise D3MError
        raise D3MError(f"{first / SETTINGS_FILE} is damaged ({exc!r}); build again into a new --workdir") from None
    # 3. tensors and labels through d3mfmt's writer (temporary file, then rename)
    archive = d3mfmt.Archive(
        manifest,
        embeddings=emb.astype(np.float16),
        seeds=np.stack([t["seeds"] for t, _ in parts]),
        labels=d3mfmt.encode_labels(np.concatenate([t["probs"] for t, _ in parts]), manifest.labels),
        fingerprints=np.stack([t["fingerprints"] for t, _ in parts]),
    )
    d3mfmt.save_file(archive, out)
    return archive


def merge_archives(workdirs: list[Path], out: Path, *, labels: LabelEncoding,
                   min_agreement: float | None = None) -> BuildResult:
    """Write ``out`` from the finished work directories of every shard of one build."""
    out = Path(out)
    if not workdirs:
        raise D3MError("merge needs at least one work directory")
    check_min_agreement(min_agreement)
    archive = write_archive(list(workdirs), out, labels, out.name.removesuffix(".d3m"), min_agreement=min_agreement)
    return BuildResult(out, archive, summarize_build(list(workdirs), out, archive, None))


def summarize_build(workdirs: list[Path], out: Path, archive: d3mfmt.Archive, seconds: float | None) -> list[str]:
    """Closing summary: seconds per stage, bytes per member, teacher agreement and the classes it flags."""
    from d3mfmt.container import read_zip

    classes = archive.manifest.dataset.classes
    metas = [m for _, m in finished_classes(workdirs)[1]]
    stages = {k: sum(m["seconds"][k] for m in metas) for k in metas[0]["seconds"]}
    lines = [f"built {out}" + (f" in {seconds:.0f}s (this run; resumed classes excluded)" if seconds is not None else "")]
    lines += [f"  stage {k:<8}{v:8.1f}s (all classes)" for k, v in stages.items()]
    for member, payload in read_zip(out.read_bytes()).items():
        lines.append(f"  {member:<22}{len(payload):>10,} bytes")
    lines.append(f"  file                  {out.stat().st_size:>10,} bytes")
    real = [m.get("real_agreement") for m in metas]
    regen = [m["regenerated"] for m in metas]
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
