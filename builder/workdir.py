"""The work directory of a build: the settings it is bound to, one checkpoint per finished class.

Both files are read back on resume and merge, so both are checked: a damaged
settings record or class checkpoint is a D3MError naming the file and what to
do, never a traceback from json or safetensors. Also here: the output check a
build runs before its first class.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from d3mfmt import D3MError
from d3mfmt.files import write_atomic
from d3mfmt.terminal import printable

SETTINGS_FILE = "settings.json"
LABELS_FILE = "labels.json"  # the label options the build was started with (the merge's default)
RECORD_KEYS = ("settings", "classes", "source", "generator", "teacher")  # what every record holds
OPTIONAL_RECORD_KEYS = ("embedding_dim",)  # absent in work directories of older builds (added on resume)
LABEL_FIELDS = ("kind", "k", "values")
REBUILD_CLASS = "delete it and run the same build again (same --workdir) to rebuild that class, then merge"


def check_output_path(out: Path) -> None:
    """Refuse an archive path whose folder is missing or cannot take a new file (create and remove one there)."""
    out = Path(out)
    folder = out.parent
    if out.is_dir():
        raise D3MError(f"-o {out} is a folder; name the archive file to write, e.g. {out / 'out.d3m'}")
    if not folder.is_dir():
        raise D3MError(f"-o {out}: the folder {folder} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise D3MError(f"-o {out}: cannot write in {folder} ({exc.strerror or exc}); "
                       "choose an output folder you can write to") from None


class Workdir:
    """Per-class checkpoints plus the settings they were made with."""

    def __init__(self, path: Path, create: bool = True):
        self.path = Path(path)
        if create:
            (self.path / "classes").mkdir(parents=True, exist_ok=True)

    def bind(self, record: dict) -> None:
        """Record the build's identity, or refuse one made with other settings."""
        f = self.path / SETTINGS_FILE
        if f.is_file():
            old = self.record()
            older = {k: v for k, v in record.items() if k in old}  # a record of an older build lacks optional keys
            if old != older or set(old) - set(record):
                raise D3MError(f"work directory {self.path} holds a build with other settings or data; "
                               "use a new --workdir (or the same settings to resume)")
            if old == record:
                return
        write_atomic(f, json.dumps(record, indent=1, sort_keys=True).encode())

    def bind_labels(self, labels) -> None:
        """Record the label options (a LabelEncoding) of this run: the merge's default, and what it must match."""
        wanted = {k: getattr(labels, k) for k in LABEL_FIELDS}
        f = self.path / LABELS_FILE
        if not f.is_file() or self.labels() != wanted:
            write_atomic(f, json.dumps(wanted, sort_keys=True).encode())

    def labels(self) -> dict | None:
        """The label options recorded by :meth:`bind_labels` ({kind, k, values}), or None."""
        f = self.path / LABELS_FILE
        if not f.exists():
            return None
        try:
            value = json.loads(f.read_bytes())
            ok = isinstance(value, dict) and set(value) == set(LABEL_FIELDS) and isinstance(value["kind"], str)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise D3MError(f"{f} is damaged; delete it and pass the label options (--label-kind, --k, --values) "
                           "the build used")
        return value

    def record_digest(self) -> str:
        """The build's settings hash: what every class checkpoint of this work directory carries."""
        return record_digest(self.record())

    def record(self) -> dict:
        f = self.path / SETTINGS_FILE
        if not f.is_file():
            raise D3MError(f"{self.path} is not a d3m-build work directory (no {SETTINGS_FILE})")
        try:
            record = json.loads(f.read_bytes())
            problem = _record_problem(record)
        except (OSError, ValueError) as exc:
            problem = str(exc)
        if problem:
            raise D3MError(f"{f} is damaged ({printable(problem)[:200]}); this work directory cannot be resumed "
                           "or merged: build again into a new --workdir")
        return record

    def class_file(self, c: int) -> Path:
        return self.path / "classes" / f"{c:06d}.safetensors"

    def done(self, c: int) -> bool:
        f = self.class_file(c)
        if f.exists() and not f.is_file():
            raise D3MError(f"class checkpoint {f} is not a file; remove it (rm -r {f}) and run the same build "
                           "again (same --workdir) to rebuild that class")
        return f.is_file()

    def save_class(self, c: int, tensors: dict, meta: dict) -> None:
        """Checkpoint class ``c`` (atomic): its tensors, and its metadata (with the build's settings hash) as JSON."""
        meta = {**meta, "build": self.record_digest()}
        data = safetensors.numpy.save(tensors, metadata={"meta": json.dumps(meta, sort_keys=True)})
        write_atomic(self.class_file(c), data)

    def load_class(self, c: int) -> tuple[dict, dict]:
        """(tensors, metadata) of a finished class; D3MError naming the file when it is damaged."""
        f = self.class_file(c)
        try:
            tensors = safetensors.numpy.load(f.read_bytes())
            with safetensors.safe_open(f, "np") as handle:
                meta = json.loads(handle.metadata()["meta"])
        except Exception as exc:  # safetensors' own error type, OSError, KeyError, TypeError, ValueError
            raise D3MError(f"class checkpoint {f} is unreadable ({printable(exc)[:200]}); {REBUILD_CLASS}") from None
        if isinstance(meta, dict) and "regenerated" not in meta and "accuracy" in meta:
            meta["regenerated"] = meta.pop("accuracy")  # the key's name in work directories of older builds
        record = self.record()
        problem = _checkpoint_problem(tensors, meta, record)
        if problem is None and "build" in meta and meta["build"] != record_digest(record):  # absent: an older build's
            problem = (f"it belongs to another build (settings hash {printable(str(meta['build']))[:19]}..., this work "
                       f"directory's {record_digest(record)[:19]}...): copied from another work directory")
        if problem:
            raise D3MError(f"class checkpoint {f} is damaged: {problem}; {REBUILD_CLASS}")
        return tensors, meta


def _record_problem(record) -> str | None:
    """What is wrong with a settings.json record's shape, or None (its values are checked by the manifest)."""
    if not isinstance(record, dict) or not set(RECORD_KEYS) <= set(record) <= {*RECORD_KEYS, *OPTIONAL_RECORD_KEYS}:
        return "not a d3m-build settings record"
    dim = record.get("embedding_dim", 1)
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        return "embedding_dim must be a positive integer"
    s = record["settings"] if isinstance(record["settings"], dict) else {}
    inversion = s.get("inversion") if isinstance(s.get("inversion"), dict) else {}
    ints = {"ipc": s.get("ipc"), "grid": s.get("grid"), "fingerprint_size": s.get("fingerprint_size"),
            "inversion.n_vectors": inversion.get("n_vectors")}
    bad = [k for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        return f"settings {bad} must be positive integers"
    if not isinstance(record["classes"], list) or not all(isinstance(c, dict) for c in record["classes"]):
        return "classes must be a list of objects"
    return None


def _checkpoint_problem(tensors: dict, meta, record: dict) -> str | None:
    """What is wrong with a class checkpoint's content for this build's record, or None."""
    s, num_classes = record["settings"], len(record["classes"])
    ipc, g2, fp = s["ipc"], s["grid"] ** 2, s["fingerprint_size"]
    expected = {"embedding": (s["inversion"]["n_vectors"], record.get("embedding_dim")), "seeds": (ipc,),
                "probs": (ipc * g2, num_classes), "fingerprints": (ipc, fp, fp)}
    if set(tensors) != set(expected):
        return f"tensors {sorted(tensors)}, expected {sorted(expected)}"
    for name, shape in expected.items():
        got = tensors[name].shape
        if len(got) != len(shape) or any(w is not None and w != n for w, n in zip(shape, got)):
            what = " (the model's embedding width)" if name == "embedding" and got[-1:] != shape[-1:] else ""
            return f"{name} has shape {got}, expected {tuple('D' if w is None else w for w in shape)}{what}"
    return _tensor_values_problem(tensors) or _meta_problem(meta)


FP16_MAX = 65504.0  # the archive stores embeddings as float16


def _tensor_values_problem(tensors: dict) -> str | None:
    """What is wrong with a checkpoint's values (dtypes, ranges, label rows), or None."""
    emb, probs, seeds, prints = (tensors[k] for k in ("embedding", "probs", "seeds", "fingerprints"))
    for name, values in (("embedding", emb), ("probs", probs)):
        if not np.issubdtype(values.dtype, np.floating) or not np.isfinite(values).all():
            return f"{name} holds NaN, infinite or non-float values"
    if np.abs(emb).max(initial=0) > FP16_MAX:
        return f"embedding holds values beyond float16's range (|x| <= {FP16_MAX:g})"
    if probs.min(initial=0) < 0 or not np.allclose(probs.sum(axis=1), 1, atol=1e-3):
        return "probs rows must be probabilities (non-negative, each row summing to 1)"
    if seeds.dtype != np.int64 or seeds.min(initial=0) < 0:
        return f"seeds must be non-negative int64, got {seeds.dtype} (smallest {seeds.min(initial=0)})"
    if prints.dtype != np.uint8:
        return f"fingerprints must be uint8, got {prints.dtype}"
    return None


def _number(value) -> bool:
    """A finite JSON number (not a bool; an integer within float's range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 2**53 if isinstance(value, int) else math.isfinite(value)


def _meta_problem(meta) -> str | None:
    """What is wrong with a checkpoint's metadata (every value the archive and the summary read), or None."""
    if not isinstance(meta, dict):
        return "its metadata is not an object"
    for key in ("regenerated", "real_agreement"):
        value = meta.get(key)
        if (key == "regenerated" or value is not None) and not (_number(value) and 0 <= value <= 1):
            return f"metadata {key!r} must be a fraction in 0..1, got {printable(repr(value))[:40]}"
    seconds = meta.get("seconds")
    if not isinstance(seconds, dict) or not all(isinstance(k, str) and _number(v) for k, v in seconds.items()):
        return "metadata 'seconds' must map stage names to numbers"
    inversion = meta.get("inversion")
    if inversion is not None and not (isinstance(inversion, dict) and all(
            _number(inversion.get(k)) for k in ("val_loss_init", "val_loss_best", "best_step"))):
        return "metadata 'inversion' must hold numbers val_loss_init, val_loss_best and best_step"
    return None


def record_digest(record: dict) -> str:
    """``sha256:`` over a record's canonical JSON (its required keys: optional ones are added on resume)."""
    core = {k: record[k] for k in RECORD_KEYS}
    return "sha256:" + hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def label_flags(labels: dict) -> str:
    """``--label-kind topk --k 5 --values u8sqrt`` for recorded label options."""
    flags = f"--label-kind {labels['kind']}"
    if labels.get("k") is not None and labels["kind"] == "topk":
        flags += f" --k {labels['k']}"
    return flags + ("" if labels.get("values") is None else f" --values {labels['values']}")
