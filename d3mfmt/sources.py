"""Where archives come from: a path, a Hugging Face hub id, or a URL pinned by sha256.

:func:`resolve_archive` turns any of these into a local file before the reader
sees it; the reader itself never touches the network.

- a path (``str`` or ``os.PathLike``): used as it is;
- ``hf://datasets/ORG/NAME[@REVISION]/PATH.d3m`` (the form ``huggingface_hub``
  uses): looked up in the local Hugging Face cache; fetched into it only with
  ``allow_download=True`` (and never while ``HF_HUB_OFFLINE`` is set), like models;
- ``https://…/x.d3m#sha256=<hex>`` (or ``http://``, or the digest passed as
  ``sha256=``): the file's sha256 pins it. It lives in the d3mfmt cache as
  ``<cache>/archives/<sha256>/<name>``; a cached one loads offline once its bytes
  hash to the pin again (a changed copy is refused, or fetched anew with
  ``allow_download=True``), a missing one is fetched only with ``allow_download=True``
  by :func:`d3mfmt.downloads.download_pinned`: bounded in bytes and in time
  (``DownloadLimits``), http(s) only, streamed to a temporary file, verified, then
  renamed into place; a wrong digest, an oversized, slow, broken or interrupted
  transfer leaves nothing behind. A URL without a digest is refused unless the
  caller passes ``allow_unpinned=True``; it is then fetched every time (there is
  nothing to look it up by) and its digest is logged so that it can be pinned.

``sha256=`` given with a path or hub id checks that file too, its size and kind
first (a 16 GiB or non-regular file is refused before a byte is hashed).

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
import shlex
import urllib.parse
from pathlib import Path

from .container import open_regular
from .downloads import CHUNK_BYTES, DownloadLimits, download_pinned
from .errors import D3MError, D3MModelError
from .files import cache_root, safe_file_name

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
URL_SCHEMES = ("https://", "http://")
ARCHIVES_CACHE = "archives"  # sibling of the model-identity and image caches
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
    download_limits: DownloadLimits | None = None,
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
        download_limits: how long a URL download may take: per socket operation
            and overall (default ``DownloadLimits()``: 60 s and 900 s).

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
        return _resolve_url(ref, expected, allow_download, allow_unpinned,
                            lambda url, digest, name: download_pinned(url, digest, name, progress=progress,
                                                                      limits=download_limits))
    elif _SCHEME.match(ref):
        raise D3MError(f"archive {ref!r}: unsupported scheme; use a path, hf://datasets/ORG/NAME/FILE.d3m or https://")
    else:
        path = Path(ref).expanduser()
    # 3. a digest given for a local or hub file is checked too (its size and kind first)
    if expected is not None:
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
    from .models import check_hub_id, check_revision

    repo, revision = m.group("repo"), m.group("revision")
    if revision is not None:
        revision = urllib.parse.unquote(revision)
    try:  # huggingface_hub's own rules, as a D3MError rather than its HFValidationError
        check_hub_id(repo, what="dataset")
        check_revision(revision)
    except D3MModelError as exc:
        raise D3MError(f"{ref!r}: {exc}") from None
    return repo, revision, m.group("file")


def hub_download_command(repo: str, filename: str, revision: str | None) -> str:
    """The shell command that fetches one file of a hub dataset, every part quoted."""
    parts = ["hf", "download", "--repo-type", "dataset", repo, filename] + (["--revision", revision] if revision else [])
    return " ".join(shlex.quote(part) for part in parts)


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
        command = hub_download_command(repo, filename, revision)
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


def _resolve_url(ref: str, expected: str | None, allow_download: bool, allow_unpinned: bool, fetch) -> Path:
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
    # 2. a pinned file already in the cache loads offline, once its bytes hash to the pin again
    try:
        name = _url_name(urllib.parse.urlsplit(url).path)
    except ValueError as exc:  # an unclosed IPv6 bracket, say
        raise D3MError(f"{url!r} is not a valid URL ({exc})") from None
    if digest is not None:
        cached = url_cache_dir() / digest / name
        if cached.is_file():
            actual = _file_sha256(cached)
            if actual == digest:
                return cached
            if not allow_download:
                raise D3MError(f"{cached}: the cached copy of {url} has sha256 {actual}, not the pinned {digest} "
                               "(it changed after it was fetched); delete it, or pass allow_download=True "
                               "(d3m-inspect: --allow-download) to fetch it again")
            log.warning("%s: the cached copy does not match its pin %s; fetching it again", cached, digest)
    if not allow_download:
        raise D3MError(f"{url} is not in the d3mfmt cache ({url_cache_dir()}); pass allow_download=True "
                       "(d3m-inspect: --allow-download) to fetch it")
    # 3. fetch, verify, then rename into place (replacing a damaged copy)
    return fetch(url, digest, name)


def _file_sha256(path: Path) -> str:
    """The sha256 of a regular file, streamed; its size and kind are checked before a byte is hashed."""
    digest = hashlib.sha256()
    with open_regular(path) as (f, _):
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
