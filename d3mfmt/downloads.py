"""Fetching a pinned URL into the archive cache, bounded in bytes and in time, leaving nothing behind.

:func:`download_pinned` streams an ``http(s)://`` URL into a temporary file beside
its cache entry, checks the sha256 pin, then renames it into place. What a
hostile or broken server can do is bounded here:

- **time**: every socket operation waits at most ``DownloadLimits.timeout_s``, and
  the whole transfer (connects, redirects, headers, body) at most
  ``DownloadLimits.deadline_s``: a watchdog shuts the sockets down when it passes,
  so a server dripping one byte per second cannot hold a reader for hours;
- **bytes**: at most :data:`MAX_DOWNLOAD_BYTES` (what a .d3m may hold); a
  Content-Length must be plain ASCII digits, agree with itself, and be met exactly;
- **where**: redirects are followed only to ``http://`` and ``https://``; a
  malformed redirect target is a D3MError naming both URLs;
- **leftovers**: on any exception, Ctrl-C, SIGTERM or SIGHUP the temporary file
  is removed (a signal whose handler was the default is then re-delivered, so
  the process still ends as the signal asks); what SIGKILL leaves is swept by a
  later download once it is a day old.

Importing this module imports no HTTP stack; a download does.

Example:
    >>> download_pinned("https://example.org/x.d3m", "ab12...", "x.d3m",          # doctest: +SKIP
    ...                 limits=DownloadLimits(deadline_s=3600))
    PosixPath('/root/.cache/d3mfmt/archives/ab12.../x.d3m')
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .container import MAX_ARCHIVE_BYTES
from .errors import D3MError

log = logging.getLogger(__name__)

MAX_DOWNLOAD_BYTES = MAX_ARCHIVE_BYTES  # a hostile server cannot send more than the format allows
CHUNK_BYTES = 1 << 20
MAX_REDIRECTS = 5
STALE_PART_S = 24 * 3600  # a .part file untouched this long belongs to no live download
HTTP_SCHEMES = ("http", "https")
CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII only: str.isdigit() also takes '²'


@dataclass(frozen=True)
class DownloadLimits:
    """How long a download may take (d3m-inspect: ``--download-timeout``, ``--download-deadline``).

    Attributes:
        timeout_s: seconds any one socket operation (connect, a read) may wait.
        deadline_s: seconds the whole transfer may take, headers and redirects
            included; the default admits a 4 GiB archive at about 5 MB/s.
    """

    timeout_s: float = 60.0
    deadline_s: float = 900.0

    def __post_init__(self):
        for name in ("timeout_s", "deadline_s"):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value <= 0:
                raise D3MError(f"DownloadLimits.{name} must be a positive number of seconds, got {value!r}")


class _Interrupted(BaseException):
    """A cleanup signal arrived during a download (re-delivered once the temporary file is gone)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum} during a download")
        self.signum = signum


def download_pinned(url: str, digest: str | None, name: str, *, progress: bool = True,
                    limits: DownloadLimits | None = None) -> Path:
    """Stream ``url`` into the cache as ``<sha256>/<name>``; nothing is left behind on any failure.

    Args:
        url: an ``http://`` or ``https://`` URL (no fragment).
        digest: the pinned sha256 (lower-case hex), or None for an unpinned fetch.
        name: the file name in the cache entry (already made safe).
        progress: a tqdm bar on stderr.
        limits: per-operation timeout and overall deadline (default ``DownloadLimits()``).

    Returns:
        The cached file, ``<cache>/archives/<sha256>/<name>``.
    """
    from .sources import url_cache_dir

    # 1. check inputs
    limits = DownloadLimits() if limits is None else limits
    if not isinstance(limits, DownloadLimits):
        raise D3MError(f"download limits must be a d3mfmt.DownloadLimits, got {type(limits).__name__}")
    if urllib.parse.urlsplit(url).scheme.lower() not in HTTP_SCHEMES:
        raise D3MError(f"{url!r}: only http:// and https:// URLs are downloaded")
    root = url_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise D3MError(f"cannot create the archive cache {root} ({exc.strerror}); set D3MFMT_CACHE_DIR") from None
    _sweep_stale_parts(root, limits)
    # 2. the bytes, into a temporary file beside the cache entry, removed on anything but success
    with _cleanup_on_signals():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=root)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _stream(url, out, name, progress, limits)
                out.flush()
                os.fsync(out.fileno())
            return _store(url, tmp, actual, digest, root / actual / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _sweep_stale_parts(root: Path, limits: DownloadLimits) -> None:
    """Remove temporary files no live download can own: untouched for longer than any transfer may take.

    What SIGKILL or a power cut leaves behind (nothing else can remove it then);
    a live transfer writes its file at least once per ``timeout_s``.
    """
    stale = time.time() - max(STALE_PART_S, limits.deadline_s)
    for part in root.glob(".*.part"):
        with contextlib.suppress(OSError):  # another process may sweep it at the same moment
            if part.is_file() and part.stat().st_mtime < stale:
                part.unlink()


def _store(url: str, tmp: str, actual: str, digest: str | None, final: Path) -> Path:
    """Check the pin, then rename the finished temporary file into place."""
    if digest is not None and actual != digest:
        raise D3MError(f"{url}: sha256 {actual} does not match the pinned {digest}; the file was not cached "
                       "(the server holds another file than the one pinned)")
    if digest is None:
        log.warning("%s was fetched unpinned; pin it next time with #sha256=%s", url, actual)
    try:
        final.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except OSError as exc:
        raise D3MError(f"{url}: cannot store it in the archive cache {final.parent.parent} ({exc.strerror or exc}); "
                       "free disk space or set D3MFMT_CACHE_DIR to a writable folder") from None
    return final


@contextlib.contextmanager
def _cleanup_on_signals():
    """In the main thread, SIGTERM/SIGHUP whose handler is the default raise instead, so ``finally`` runs;
    the signal is re-delivered with the default handler back once the block is left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in CLEANUP_SIGNALS}
    ours = [sig for sig, handler in previous.items() if handler is signal.SIG_DFL]  # others: the owner's choice

    def interrupt(signum, frame):
        raise _Interrupted(signum)

    for sig in ours:
        signal.signal(sig, interrupt)
    try:
        yield
    except _Interrupted as stop:
        for sig in ours:
            signal.signal(sig, signal.SIG_DFL)
        ours = []
        os.kill(os.getpid(), stop.signum)  # the default action: the process ends as the signal asked
        raise
    finally:
        for sig in ours:
            signal.signal(sig, previous[sig])


class _Deadline:
    """Shuts down every socket of one download when ``seconds`` have passed; ``expired`` says it did."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, or detached into its TLS wrapper
        sock.shutdown(socket.SHUT_RDWR)


def _opener(url: str, deadline: _Deadline):
    """A urllib opener for http(s) only, whose connections the deadline watches and whose redirects are checked."""
    import http.client
    import urllib.request

    def watched(base):
        class Connection(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                create = self._create_connection  # the TCP socket, before any TLS handshake
                self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))

            def connect(self):
                super().connect()
                deadline.watch(self.sock)  # after TLS, the wrapping socket

        return Connection

    http_conn, https_conn = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class Plain(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_conn, req)

    class Secure(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_conn, req, context=self._context)

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS

        def http_error_302(self, req, fp, code, msg, headers):
            target = headers.get("location") or headers.get("uri")
            if target is not None:
                _check_redirect(url, req.full_url, target, fp)
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    # only these handlers: no file://, ftp:// or data: (build_opener would add them)
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), Plain(), Secure(), Redirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _check_redirect(url: str, current: str, target: str, fp) -> None:
    """Refuse a redirect to a malformed URL or to anything but http(s)."""
    try:
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(current, target))
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
        ok = parts.scheme.lower() in HTTP_SCHEMES and bool(parts.hostname)
        problem = "" if ok else "only http:// and https:// redirects are followed"
    except ValueError as exc:
        problem = f"a malformed URL ({exc})"
    if problem:
        fp.close()
        raise D3MError(f"{url}: the server redirects to {target[:300]!r}: {problem}; nothing was cached")


def _declared_length(url: str, headers) -> int | None:
    """The Content-Length, strictly: ASCII digits, one value; None when absent."""
    values = headers.get_all("Content-Length") or []
    if not values:
        return None
    text = {v.strip() for v in values}
    if len(text) != 1 or not _DIGITS.fullmatch(next(iter(text))):
        raise D3MError(f"{url}: the server sent a malformed Content-Length {values[:4]!r}; nothing was cached")
    return int(next(iter(text)))


def _stream(url: str, out, name: str, progress: bool, limits: DownloadLimits) -> str:
    """Copy ``url``'s body into the open file ``out``, bounded in bytes and time; return its sha256 hex digest."""
    import http.client
    import urllib.error

    from tqdm.auto import tqdm

    hasher, received = hashlib.sha256(), 0
    with _Deadline(limits.deadline_s) as deadline:
        try:
            with _opener(url, deadline).open(url, timeout=limits.timeout_s) as response:
                total = _declared_length(url, response.headers)
                if total is not None and total > MAX_DOWNLOAD_BYTES:
                    raise D3MError(f"{url}: the server announces {total} bytes, more than a .d3m may hold "
                                   f"({MAX_DOWNLOAD_BYTES}); refusing to download it")
                with tqdm(total=total, desc=name, unit="B", unit_scale=True, file=sys.stderr,
                          disable=not progress) as bar:
                    while chunk := response.read(CHUNK_BYTES):
                        received += len(chunk)
                        if received > MAX_DOWNLOAD_BYTES:
                            raise D3MError(f"{url}: more than {MAX_DOWNLOAD_BYTES} bytes, more than a .d3m "
                                           "may hold; download stopped")
                        hasher.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
                if not deadline.expired and total is not None and received != total:
                    raise D3MError(f"{url}: transfer incomplete ({received} of {total} bytes); try again")
        except D3MError:
            if not deadline.expired:
                raise
        except urllib.error.HTTPError as exc:
            raise D3MError(f"{url}: HTTP {exc.code} {str(exc.reason)[:200]}") from None
        except urllib.error.URLError as exc:
            if not deadline.expired:
                raise D3MError(f"{url}: cannot connect ({str(exc.reason)[:200]})") from None
        except (http.client.HTTPException, OSError, ValueError) as exc:  # IncompleteRead, reset, timeout, bad URL
            if not deadline.expired:
                raise D3MError(f"{url}: transfer failed ({str(exc)[:200] or type(exc).__name__}); nothing was "
                               "cached, try again") from None
    if deadline.expired:
        raise D3MError(
            f"{url}: the download did not finish within its deadline of {limits.deadline_s:g} s "
            f"({received:,} bytes received); nothing was cached. For a large archive or a slow link raise it: "
            "download_limits=d3mfmt.DownloadLimits(deadline_s=...) for d3mfmt.load_file or resolve_archive "
            "(d3m-inspect: --download-deadline)"
        )
    return hasher.hexdigest()
