"""The label options of a build: parsed, checked against the class count, recorded, and given back to the merge.

``--label-kind/--k/--values`` become a ``d3mfmt.LabelEncoding`` (:func:`label_encoding`);
a bad combination, or an explicit ``--k`` above the class count, fails before any work. A build
records the options it ran with in its work directory (``labels.json``, builder/workdir.py);
``d3m-build merge`` writes with them unless given others (:func:`recorded_labels`: then the
labels are re-encoded from the checkpoints), and refuses shards that recorded different ones.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from d3mfmt import D3MError, LabelEncoding

from .workdir import Workdir, label_flags

log = logging.getLogger("d3m-build")

DENSE_VALUES = "f16"  # the dense encoding's value codec unless --values says otherwise


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


def check_requested_k(k: int | None, num_classes: int) -> None:
    """An explicit ``--k`` above the class count is refused (the default, 5, is capped at the class count)."""
    if k is not None and k > num_classes:
        raise D3MError(f"--k {k}: the data has {num_classes} classes, so at most --k {num_classes} entries can be "
                       f"kept per label; pass --k {num_classes} or less, or leave --k out (default: "
                       f"min({LabelEncoding().k}, classes))")


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


def recorded_labels(workdirs: list[Path], labels: LabelEncoding | None) -> LabelEncoding:
    """The label encoding to write: the build's recorded options, or ``labels`` when given.

    Shards that recorded different options are refused (builder.assemble.finished_classes); options
    given to the merge that differ from the recorded ones re-encode the build's labels, and say so.
    """
    recorded = next((r for r in (Workdir(p, create=False).labels() for p in workdirs) if r is not None), None)
    if labels is None:
        return LabelEncoding() if recorded is None else label_encoding(recorded["kind"], recorded["k"],
                                                                       recorded["values"])
    asked = {"kind": labels.kind, "k": labels.k, "values": labels.values}
    if recorded is not None and recorded != asked:
        log.info("writing the labels as %s (the build ran with %s): the soft labels are re-encoded from the "
                 "checkpoints, nothing is rendered", label_flags(asked), label_flags(recorded))
    return labels
