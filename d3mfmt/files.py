"""Files d3mfmt writes: atomic files and folders, safe file names, the cache root.

Nothing here is half-written after a failure: a file is written beside its
destination and renamed over it, a folder is assembled beside its destination
and renamed into place. Importing this module imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import D3MError

_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")


def cache_root() -> Path:
    """Where d3mfmt keeps its caches: $D3MFMT_CACHE_DIR, else $XDG_CACHE_HOME/d3mfmt, else ~/.cache/d3mfmt."""
    if os.environ.get("D3MFMT_CACHE_DIR"):
        return Path(os.environ["D3MFMT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "d3mfmt"


def safe_file_name(text: str, *, default: str, suffix: str = "", max_chars: int | None = None) -> str:
    """``text`` as one portable file name.

    Every run of characters outside ``[A-Za-z0-9._-]`` becomes ``_`` (so no
    path separator survives), leading and trailing ``.``/``_`` go (so never
    hidden, ``.`` or ``..``), then at most ``max_chars`` are kept; ``default``
    when nothing is left; ``suffix`` appended unless the name already ends in it.

    Example:
        >>> safe_file_name("../évil name.d3m", default="archive", suffix=".d3m")
        'vil_name.d3m'
    """
    name = _UNSAFE_RUN.sub("_", text).strip("._")[:max_chars] or default
    return name if name.endswith(suffix) else name + suffix


def write_atomic(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write to a unique temporary file beside ``path`` (fsync'd when ``durable``), then rename over it."""
    path = Path(path)
    if not path.parent.is_dir():
        raise D3MError(f"{path}: the folder {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_new_folder(path: str | os.PathLike) -> None:
    """Raise D3MError unless ``path`` is free for a new folder: absent, or an empty folder."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise D3MError(f"{path} exists and is not an empty folder; pick a new output folder")


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike):
    """Yield a temporary folder beside ``dest`` that becomes ``dest`` only when the body succeeds.

    ``dest`` must not exist or be an empty folder; missing parents are created.
    After a failure nothing this function made is left (an empty folder the
    user made stays as it was), and an OSError while assembling becomes a
    D3MError naming ``dest``.

    Example:
        >>> with atomic_folder("out/embeddings") as tmp:      # doctest: +SKIP
        ...     (tmp / "a.txt").write_text("only seen once complete")
    """
    path = Path(dest).absolute()
    check_new_folder(path)
    top = path.parent  # the outermost parent this call creates, removed again on failure
    while not top.parent.exists():
        top = top.parent
    created = not top.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        if created:
            shutil.rmtree(top, ignore_errors=True)
        raise D3MError(f"{dest}: cannot create the folder ({exc.strerror or exc})") from None
    done = False
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        os.replace(tmp, path)  # also replaces an empty folder at path
        done = True
    except OSError as exc:
        raise D3MError(f"{dest}: cannot write the folder ({exc.strerror or exc})") from None
    finally:
        if not done:
            shutil.rmtree(top if created else tmp, ignore_errors=True)
