"""Where archives come from: a path, a Hugging Face hub id, or a URL pinned by sha256.

:func:`resolve_archive` turns any of these into a local file before the reader
sees it; the reader itself never touches the network.

- a path (``str`` or ``os.PathLike``): used as it is;
- ``hf://datasets/ORG/NAME[@REVISION]/PATH.d3m`` (the form ``huggingface_hub``
  uses): looked up in the local Hugging Face cache; fetched into it only with
  ``allow_download=True`` (and never while ``HF_HUB_OFFLINE`` is set), like models;
- ``https://…/x.d3m#sha256=<hex>`` (or ``http://``, or the digest passed as
  ``sha256=``): the file's sha256 pins it. It lives in the d3mfmt cache as
  ``<cache>/archives/<sha256>/<name>``; a cached one loads offline, a missing one
  is fetched only with ``allow_download=True``, streamed to a temporary file,
  verified, then renamed into place: a wrong digest, an oversized or broken
  transfer leaves nothing behind. A URL without a digest is refused unless the
  caller passes ``allow_unpinned=True``; it is then fetched every time (there is
  nothing to look it up by) and its digest is logged so that it can be pinned.

``sha256=`` given with a path or hub id checks that file too.

Importing this module imports neither huggingface_hub nor urllib's HTTP stack.

Example:
    >>> resolve_archive("spec/vectors/topk.d3m").name                      # doctest: +SKIP
    'topk.d3m'
    >>> resolve_archive("hf://datasets/org/mnist-d3m@v1/mnist_ipc10.d3m")  # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/datasets--org--mnist-d3m/snapshots/.../mnist_ipc10.d3m')
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import urllib.parse
from pathlib import Path

from .container import MAX_ARCHIVE_BYTES
from .errors import D3MError
from .files import cache_root, safe_file_name

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
URL_SCHEMES = ("https://", "http://")
ARCHIVES_CACHE = "archives"  # sibling of the model-identity and image caches
MAX_DOWNLOAD_BYTES = MAX_ARCHIVE_BYTES  # a hostile server cannot send more than the format allows
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation, not for the whole transfer
CHUNK_BYTES = 1 << 20
_HF_ID = re.compile(
    r"^hf://datasets/(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
    r"(?:@(?P<revision>[^/]+))?/(?P<file>[^?#]+)$"
)
_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def resolve_archive(
    ref: str | os.PathLike,
    *,
    allow_download: bool = False,
    sha256: str | None = None,
    allow_unpinned: bool = False,
    progress: bool = True,
) -> Path:
    """The local path of an archive given as a path, ``hf://`` id or pinned URL.

    Args:
        ref: a path, ``"hf://datasets/ORG/NAME[@REVISION]/PATH.d3m"``, or an
            ``https://`` URL (pinned by a ``#sha256=<hex>`` fragment or ``sha256``).
        allow_download: fetch a hub file or URL that is not cached yet (off by
            default: the same switch that lets a model be downloaded).
        sha256: expected sha256 of the file's bytes (64 hex digits, optionally
            prefixed ``sha256:``); required for URLs unless ``allow_unpinned``.
        allow_unpinned: accept a URL without a digest (fetched every time).
        progress: show a download progress bar on stderr.

    Returns:
        A path to a local file holding the archive's bytes.

    Raises:
        D3MError: a malformed reference or digest, a file that is neither cached
            nor allowed to be downloaded, a failed transfer, a digest mismatch.

    Example:
        >>> resolve_archive("spec/vectors/topk.d3m", sha256=None).name        # doctest: +SKIP
        'topk.d3m'
    """
    # 1. check inputs: the digest, then which kind of reference this is
    expected = _check_digest(sha256, "sha256")
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref:
        raise D3MError(f"archive must be a path, an hf:// id or a URL, got {ref!r}")
    # 2. resolve to a local file
    if ref.startswith(HF_SCHEME):
        path = _resolve_hub(ref, allow_download)
    elif ref.lower().startswith(URL_SCHEMES):
        return _resolve_url(ref, expected, allow_download, allow_unpinned, progress)
    elif _SCHEME.match(ref):
        raise D3MError(f"archive {ref!r}: unsupported scheme; use a path, hf://datasets/ORG/NAME/FILE.d3m or https://")
    else:
        path = Path(ref).expanduser()
    # 3. a digest given for a local or hub file is checked too
    if expected is not None and path.is_file():
        actual = _file_sha256(path)
        if actual != expected:
            raise D3MError(f"{path}: sha256 {actual} does not match the expected {expected}; "
                           "the file is not the one you pinned")
    return path


# -- hub ids -------------------------------------------------------------------


def parse_hub_id(ref: str) -> tuple[str, str | None, str]:
    """``hf://datasets/ORG/NAME[@REV]/PATH`` -> (repo id, revision or None, file path in the repo)."""
    m = _HF_ID.match(ref)
    if m is None or any(part in ("", ".", "..") for part in m.group("file").split("/")):
        raise D3MError(
            f"{ref!r} is not a hub dataset id; expected hf://datasets/ORG/NAME[@REVISION]/PATH.d3m "
            "(a revision holding '/' is written URL-encoded, e.g. @refs%2Fpr%2F1)"
        )
    revision = m.group("revision")
    return m.group("repo"), None if revision is None else urllib.parse.unquote(revision), m.group("file")


def _resolve_hub(ref: str, allow_download: bool) -> Path:
    """A hub dataset file from the local Hugging Face cache (or, if allowed, fetched into it)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision, filename = parse_hub_id(ref)
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision,
                                    local_files_only=not allow_download or offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        command = f"huggingface-cli download --repo-type dataset {repo} {filename}"
        command += f" --revision {revision}" if revision else ""
        how = (
            "HF_HUB_OFFLINE is set, so nothing is downloaded; unset it (allow_download=True is already given)"
            if allow_download else
            f"download it once with `{command}`, or pass allow_download=True (d3m-inspect: --allow-download)"
        )
        raise D3MError(f"{ref} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); {how}") from err
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise D3MError(f"{ref}: not found on the hub ({type(err).__name__}); check the repo id, revision and path") from err
    except HfHubHTTPError as err:
        raise D3MError(f"{ref}: download failed: {err}") from err


# -- pinned URLs ---------------------------------------------------------------


def url_cache_dir() -> Path:
    """Where pinned URLs are kept: ``<d3mfmt cache>/archives`` (see files.cache_root)."""
    return cache_root() / ARCHIVES_CACHE


def _check_digest(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    m = _DIGEST.match(value) if isinstance(value, str) else None
    if m is None:
        raise D3MError(f"{where} must be 64 hex digits (optionally prefixed 'sha256:'), got {value!r}; "
                       "compute it with `sha256sum FILE.d3m`")
    return m.group(1).lower()


def _url_name(path: str) -> str:
    """A safe file name for a URL's last path segment, ending in .d3m."""
    return safe_file_name(urllib.parse.unquote(path.rsplit("/", 1)[-1]), default="archive", suffix=".d3m",
                          max_chars=100)


def _resolve_url(ref: str, expected: str | None, allow_download: bool, allow_unpinned: bool, progress: bool) -> Path:
    # 1. the pin: a #sha256= fragment and/or the argument, which must agree
    url, _, fragment = ref.partition("#")
    pinned = None
    if fragment:
        key, _, value = fragment.partition("=")
        if key != "sha256":
            raise D3MError(f"{ref}: the only URL fragment understood is #sha256=<64 hex digits>, got #{fragment}")
        pinned = _check_digest(value, "the URL's #sha256= fragment")
    if pinned and expected and pinned != expected:
        raise D3MError(f"{ref}: the #sha256= fragment ({pinned}) and sha256= ({expected}) disagree; give one")
    digest = pinned or expected
    if digest is None and not allow_unpinned:
        raise D3MError(
            f"{url}: a URL must be pinned by its sha256: append #sha256=<hex> (from `sha256sum FILE.d3m`) or pass "
            "sha256=...; to fetch it unverified anyway pass allow_unpinned=True (d3m-inspect: --allow-unpinned)"
        )
    # 2. a pinned file already in the cache loads offline
    name = _url_name(urllib.parse.urlsplit(url).path)
    if digest is not None:
        cached = url_cache_dir() / digest / name
        if cached.is_file():
            return cached
    if not allow_download:
        raise D3MError(f"{url} is not in the d3mfmt cache ({url_cache_dir()}); pass allow_download=True "
                       "(d3m-inspect: --allow-download) to fetch it")
    # 3. fetch, verify, then rename into place
    return download_pinned(url, digest, name, progress=progress)


def download_pinned(url: str, digest: str | None, name: str, *, progress: bool = True) -> Path:
    """Stream ``url`` into the cache as ``<digest>/<name>``; nothing is left behind on any failure.

    The transfer is bounded by :data:`MAX_DOWNLOAD_BYTES` and, when the server
    sends one, by its Content-Length, which must then be met exactly.
    """
    root = url_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise D3MError(f"cannot create the archive cache {root} ({exc.strerror}); set D3MFMT_CACHE_DIR") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=root)
    try:
        # 1. the bytes, into a temporary file beside the cache entry
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, name, progress)
            out.flush()
            os.fsync(out.fileno())
        # 2. the pin, then the rename into place
        if digest is not None and actual != digest:
            raise D3MError(f"{url}: sha256 {actual} does not match the pinned {digest}; the file was not cached "
                           "(the server holds another file than the one pinned)")
        if digest is None:
            log.warning("%s was fetched unpinned; pin it next time with #sha256=%s", url, actual)
        final = root / actual / name
        try:
            final.parent.mkdir(exist_ok=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        except OSError as exc:
            raise D3MError(f"{url}: cannot store it in the archive cache {root} ({exc.strerror or exc}); "
                           "free disk space or set D3MFMT_CACHE_DIR to a writable folder") from None
        return final
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stream(url: str, out, name: str, progress: bool) -> str:
    """Copy ``url``'s body into the open file ``out``, bounded; return its sha256 hex digest."""
    import http.client
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    hasher, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 (scheme checked)
            declared = response.headers.get("Content-Length")
            total = int(declared) if declared and declared.isdigit() else None
            if total is not None and total > MAX_DOWNLOAD_BYTES:
                raise D3MError(f"{url}: the server announces {total} bytes, more than a .d3m may hold "
                               f"({MAX_DOWNLOAD_BYTES}); refusing to download it")
            with tqdm(total=total, desc=name, unit="B", unit_scale=True, file=sys.stderr, disable=not progress) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    received += len(chunk)
                    if received > MAX_DOWNLOAD_BYTES:
                        raise D3MError(f"{url}: more than {MAX_DOWNLOAD_BYTES} bytes, more than a .d3m "
                                       "may hold; download stopped")
                    hasher.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise D3MError(f"{url}: transfer incomplete ({received} of {total} bytes); try again")
    except urllib.error.HTTPError as exc:
        raise D3MError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise D3MError(f"{url}: cannot connect ({exc.reason})") from None
    except (http.client.HTTPException, OSError) as exc:  # IncompleteRead, reset, timeout
        raise D3MError(f"{url}: transfer failed ({exc!r}); nothing was cached, try again") from None
    return hasher.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise D3MError(f"{path}: cannot be read ({exc.strerror})") from None
    return digest.hexdigest()
