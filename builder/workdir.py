"""The work directory of a build: the settings it is bound to, one checkpoint per finished class.

Both files are read back on resume and merge, so both are checked: a damaged
settings record or class checkpoint is a D3MError naming the file and what to
do, never a traceback from json or safetensors. Also here: the output check a
build runs before its first class.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import safetensors
import safetensors.numpy

from d3mfmt import D3MError
from d3mfmt.files import write_atomic
from d3mfmt.terminal import printable

SETTINGS_FILE = "settings.json"
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
            if old != record:
                raise D3MError(f"work directory {self.path} holds a build with other settings or data; "
                               "use a new --workdir (or the same settings to resume)")
        else:
            write_atomic(f, json.dumps(record, indent=1, sort_keys=True).encode())

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
        return self.class_file(c).is_file()

    def save_class(self, c: int, tensors: dict, meta: dict) -> None:
        """Checkpoint class ``c`` (atomic): its tensors, and its metadata as JSON in the file's header."""
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
        problem = _checkpoint_problem(tensors, meta, self.record())
        if problem:
            raise D3MError(f"class checkpoint {f} is damaged: {problem}; {REBUILD_CLASS}")
        return tensors, meta


def _record_problem(record) -> str | None:
    """What is wrong with a settings.json record's shape, or None (its values are checked by the manifest)."""
    if not isinstance(record, dict) or set(record) != {"settings", "classes", "source", "generator", "teacher"}:
        return "not a d3m-build settings record"
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
    expected = {"embedding": (s["inversion"]["n_vectors"], None), "seeds": (ipc,),
                "probs": (ipc * g2, num_classes), "fingerprints": (ipc, fp, fp)}
    if set(tensors) != set(expected):
        return f"tensors {sorted(tensors)}, expected {sorted(expected)}"
    for name, shape in expected.items():
        got = tensors[name].shape
        if len(got) != len(shape) or any(w is not None and w != n for w, n in zip(shape, got)):
            return f"{name} has shape {got}, expected {tuple('D' if w is None else w for w in shape)}"
    if not isinstance(meta, dict) or not isinstance(meta.get("regenerated"), (int, float)) \
            or not isinstance(meta.get("seconds"), dict):
        return "its metadata lacks 'regenerated' or 'seconds'"
    return None
