"""Model resolution: turn a model id into a local diffusers folder, and hash it.

A model id is one of, checked in this order:

1. a built-in id (``"d3m/tiny-mnist"``): a key of :data:`BUILTIN_MODELS`, shipped
   inside this package. The ``d3m/`` namespace is reserved for built-ins;
2. an existing directory: used as-is;
3. a Hugging Face hub id ``org/name`` (optionally with a ``revision``): looked up
   in the local Hugging Face cache only; downloaded only with
   ``allow_download=True`` (and never while ``HF_HUB_OFFLINE`` is set).

:func:`model_identity` is a content hash of a resolved folder, the value an
archive records so that a consumer can tell it has the same weights.

Importing this module imports neither torch, diffusers nor huggingface_hub.

Example:
    >>> path = resolve_model("d3m/tiny-mnist")
    >>> (path / "model_index.json").is_file()
    True
    >>> model_identity(path)[:7]
    'sha256:'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re

from d3mfmt.errors import D3MModelError
from d3mfmt.files import cache_root

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
BUILTIN_NAMESPACE = "d3m/"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a download fetches: configs, tokenizer files and safetensors weights of a
# diffusers folder; no pickled .bin/.ckpt, no fp16/EMA variants, no safety checker.
DOWNLOAD_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
DOWNLOAD_IGNORE = ["*.fp16.*", "*non_ema*", "*.ema.*", "safety_checker/*.safetensors"]
# Files that define a model for model_identity (weights, configs, tokenizer).
IDENTITY_SUFFIXES = (".json", ".txt", ".safetensors", ".model", ".bin")
IDENTITY_CACHE_FILE = "model_identity.json"


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside d3mfmt, with the generation settings it was tuned for."""

    folder: str  # under d3mfmt/weights/
    resolution: int  # single image, pixels
    collage_resolution: int  # 2x2 collage, pixels
    steps: int  # DDIM steps (eta 0)
    guidance_scale: float
    photo_template: str
    collage_template: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "d3m/tiny-mnist": BuiltinModel(
        folder="tiny-mnist",
        resolution=32,
        collage_resolution=64,
        steps=20,
        guidance_scale=4.0,
        photo_template="a photo of handwritten digit {}",  # the training captions, class word at {}
        collage_template="a collage of handwritten digit {}",
    ),
}


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_snapshot(model_id: str, revision: str | None, allow_download: bool) -> pathlib.Path:
    """Find (or, if allowed, fetch) a hub model in the local Hugging Face cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    at = f" at revision {revision!r}" if revision else ""
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        folder = snapshot_download(
            model_id, revision=revision, local_files_only=not allow_download or offline,
            allow_patterns=DOWNLOAD_PATTERNS, ignore_patterns=DOWNLOAD_IGNORE,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        how = (
            "HF_HUB_OFFLINE is set, so nothing is downloaded; unset it and pass allow_download=True"
            if allow_download else
            f"download it once with `huggingface-cli download {model_id}"
            + (f" --revision {revision}" if revision else "")
            + "` (or pass allow_download=True)"
        )
        raise D3MModelError(
            f"model {model_id!r}{at} is not in the local Hugging Face cache "
            f"({_hf_cache_dir()}); {how}, or pass a directory path"
        ) from err
    except HfHubHTTPError as err:
        raise D3MModelError(f"model {model_id!r}{at}: download failed: {err}") from err
    path = pathlib.Path(folder)
    if not (path / "model_index.json").is_file():
        raise D3MModelError(
            f"model {model_id!r}{at} in {path} has no model_index.json; "
            "expected a diffusers pipeline folder (Stable Diffusion layout)"
        )
    return path


def resolve_model(model_id: str, revision: str | None = None, *, allow_download: bool = False) -> pathlib.Path:
    """Resolve a model id to a local diffusers pipeline folder.

    Args:
        model_id: a built-in id (``"d3m/tiny-mnist"``), a directory, or a hub id
            ``"org/name"``.
        revision: hub branch, tag or commit (hub ids only).
        allow_download: fetch a hub model that is not cached yet (off by
            default; ignored, with an error, while ``HF_HUB_OFFLINE`` is set).

    Returns:
        The absolute path of the folder (it holds ``model_index.json``).

    Raises:
        D3MModelError: unknown built-in, missing directory, model not cached.

    Example:
        >>> resolve_model("d3m/tiny-mnist").name
        'tiny-mnist'
    """
    if not isinstance(model_id, str) or not model_id:
        raise D3MModelError(f"model id must be a non-empty string, got {model_id!r}")
    if model_id.startswith(BUILTIN_NAMESPACE):
        if model_id not in BUILTIN_MODELS:
            raise D3MModelError(
                f"unknown built-in model {model_id!r}; known built-in models: {sorted(BUILTIN_MODELS)}"
            )
        if revision is not None:
            raise D3MModelError(
                f"built-in model {model_id!r} has no revisions (got revision={revision!r}); "
                "pass revision=None, its identity is model_identity(path)"
            )
        path = WEIGHTS_DIR / BUILTIN_MODELS[model_id].folder
        if not (path / "model_index.json").is_file():
            raise D3MModelError(
                f"built-in model {model_id!r}: {path} is missing or incomplete; reinstall d3mfmt "
                "or retrain it with `python examples/train_builtin_models.py`"
            )
        return path
    path = pathlib.Path(model_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise D3MModelError(
                f"model directory {model_id!r} has no revisions (got revision={revision!r}); pass revision=None"
            )
        if not (path / "model_index.json").is_file():
            raise D3MModelError(
                f"model directory {str(path)!r} has no model_index.json; expected a diffusers "
                "pipeline folder (e.g. one written by `pipe.save_pretrained(...)`)"
            )
        return path.resolve()
    if _HUB_ID.match(model_id) and not model_id.startswith((".", "~")):
        return _hub_snapshot(model_id, revision, allow_download)
    raise D3MModelError(
        f"model {model_id!r} is not a built-in model ({sorted(BUILTIN_MODELS)}), not an existing "
        "directory, and not a Hugging Face hub id of the form 'org/name'; check the path"
    )


# ---------------------------------------------------------------------------
# Content identity
# ---------------------------------------------------------------------------

_IDENTITY_MEMO: dict[tuple, str] = {}


def _identity_files(root: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(relative posix path, path) of the defining files, sorted; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.endswith(IDENTITY_SUFFIXES):
                continue
            path = pathlib.Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _sidecar_get(key: str) -> str | None:
    path = cache_root() / IDENTITY_CACHE_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no cache yet, or unreadable: recompute (the result is the same)
    value = table.get(key) if isinstance(table, dict) else None
    return value if isinstance(value, str) and value.startswith("sha256:") else None


def _sidecar_put(key: str, value: str) -> None:
    folder = cache_root()
    path = folder / IDENTITY_CACHE_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
            table = table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            table = {}
        table[key] = value
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, sort_keys=True, indent=0))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time; the identity is unchanged


def model_identity(path: str | os.PathLike) -> str:
    """Content hash of a model folder: ``"sha256:<hex>"``.

    SHA-256 over the sorted files with suffixes :data:`IDENTITY_SUFFIXES`
    (hidden files skipped, symlinks followed), each contributing
    ``relative_posix_path + b"\\0" + size as 8-byte little-endian + bytes``.
    Memoised per process and in a small sidecar file under
    :func:`d3mfmt.files.cache_root`, keyed by the files' paths, sizes and mtimes.

    Example:
        >>> model_identity(resolve_model("d3m/tiny-mnist")) == model_identity(resolve_model("d3m/tiny-mnist"))
        True
    """
    root = pathlib.Path(path).resolve()
    if not root.is_dir():
        raise D3MModelError(f"model_identity: {str(root)!r} is not a directory")
    files = _identity_files(root)
    if not files:
        raise D3MModelError(f"model_identity: {str(root)!r} holds no weight or config files")
    stats = tuple((rel, st.st_size, st.st_mtime_ns) for rel, p in files for st in [p.stat()])
    memo_key = (str(root), stats)
    if memo_key in _IDENTITY_MEMO:
        return _IDENTITY_MEMO[memo_key]
    sidecar_key = hashlib.sha256(json.dumps([str(root), stats]).encode()).hexdigest()
    identity = _sidecar_get(sidecar_key)
    if identity is None:
        digest = hashlib.sha256()
        for rel, p in files:
            digest.update(rel.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        identity = "sha256:" + digest.hexdigest()
        _sidecar_put(sidecar_key, identity)
    _IDENTITY_MEMO[memo_key] = identity
    return identity
