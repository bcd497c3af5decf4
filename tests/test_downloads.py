"""Hostile servers for pinned-URL downloads (a local http.server on 127.0.0.1 in a thread; no network):
an overall deadline, strict Content-Length, http(s)-only redirects, nothing left behind on SIGTERM,
a tampered cache entry re-verified, and size checks before hashing."""

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import run_inspect

import d3mfmt
from d3mfmt import D3MError, resolve_archive
from d3mfmt import DownloadLimits

ROOT = Path(__file__).resolve().parent.parent
TOPK = ROOT / "spec" / "vectors" / "topk.d3m"
DATA = TOPK.read_bytes()
DIGEST = hashlib.sha256(DATA).hexdigest()
DRIP_S = 0.2  # one byte every DRIP_S seconds: the per-read timeout never fires, only the deadline can
FAST = DownloadLimits(timeout_s=5, deadline_s=0.3)


@pytest.fixture(autouse=True)
def d3m_cache(tmp_path, monkeypatch):
    cache = tmp_path / "d3m-cache"
    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(cache))
    return cache


def leftovers(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


class Hostile:
    """A threaded HTTP server whose routes are functions of the request handler; stops dripping on close."""

    def __init__(self):
        self.stop = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                try:
                    getattr(owner, "route_" + self.path.strip("/").replace("-", "_").replace(".d3m", ""))(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def drip(self, h, data: bytes) -> None:
        for i in range(len(data)):
            if self.stop.is_set():
                return
            h.wfile.write(data[i : i + 1])
            h.wfile.flush()
            time.sleep(DRIP_S)

    # -- routes ----------------------------------------------------------------

    def route_topk(self, h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        h.wfile.write(DATA)

    def route_slow_body(self, h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        self.drip(h, DATA)

    def route_slow_headers(self, h):
        h.wfile.write(b"HTTP/1.0 200 OK\r\n")
        self.drip(h, b"X-Slow: " + b"a" * 200 + b"\r\n\r\n")

    def route_superscript_length(self, h):
        h.send_response(200)
        h.send_header("Content-Length", "\u00b2")  # str.isdigit() says True
        h.end_headers()
        h.wfile.write(DATA)

    def route_two_lengths(self, h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.send_header("Content-Length", "12")
        h.end_headers()
        h.wfile.write(DATA)

    def _redirect(self, h, target: str):
        h.send_response(302)
        h.send_header("Location", target)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def route_to_ftp(self, h):
        self._redirect(h, "ftp://127.0.0.1/topk.d3m")

    def route_to_file(self, h):
        self._redirect(h, f"file://{TOPK}")

    def route_to_bad_ipv6(self, h):
        self._redirect(h, "http://[::1/x.d3m")

    def route_to_topk(self, h):
        self._redirect(h, "/topk.d3m")


@pytest.fixture
def hostile():
    with Hostile() as server:
        yield server


def fetch(url: str, limits: DownloadLimits = FAST) -> Path:
    return resolve_archive(f"{url}#sha256={DIGEST}", allow_download=True, download_limits=limits)


@pytest.mark.parametrize("route", ["slow-body", "slow-headers"])
def test_a_dripping_server_meets_the_overall_deadline(hostile, d3m_cache, route):
    start = time.monotonic()
    with pytest.raises(D3MError, match=r"within its deadline of 0.3 s.*--download-deadline"):
        fetch(f"{hostile.url}/{route}.d3m")
    assert time.monotonic() - start < 3  # 4.4 KB at one byte per 0.2 s would take 15 minutes
    assert leftovers(d3m_cache) == []


def test_deadline_and_timeout_can_be_raised_and_are_checked(hostile, d3m_cache):
    assert fetch(f"{hostile.url}/topk.d3m", DownloadLimits(timeout_s=30, deadline_s=3600)).read_bytes() == DATA
    for bad in (0, -1, float("nan"), float("inf"), "60", True):
        with pytest.raises(D3MError, match="DownloadLimits.deadline_s must be a positive number"):
            DownloadLimits(deadline_s=bad)
    out = run_inspect("summary", f"{hostile.url}/slow-body.d3m#sha256={DIGEST}", "--allow-download",
                      "--download-deadline", "0.3")
    assert out.exit_code == 1 and "deadline of 0.3 s" in out.stderr and isinstance(out.exception, SystemExit)
    for bad in ("inf", "nan", "0", "-1", "x"):
        out = run_inspect("summary", TOPK, "--download-deadline", bad)
        assert out.exit_code in (1, 2) and "deadline" in out.stderr and isinstance(out.exception, SystemExit), bad
    out = run_inspect("summary", f"{hostile.url}/topk.d3m#sha256={DIGEST}", "--allow-download",
                      "--download-timeout", "30", "--download-deadline", "600")
    assert out.exit_code == 0 and "golden-topk" in out.stdout, out.output


@pytest.mark.parametrize("route, message", [
    ("superscript-length", r"malformed Content-Length \['\u00b2'\]"),
    ("two-lengths", "malformed Content-Length"),
    ("to-ftp", "redirects to 'ftp://127.0.0.1/topk.d3m': only http:// and https://"),
    ("to-file", "redirects to 'file://.*': only http:// and https://"),
    ("to-bad-ipv6", r"redirects to 'http://\[::1/x.d3m': a malformed URL"),
])
def test_strict_headers_and_redirects_are_d3m_errors_naming_the_url(hostile, d3m_cache, route, message):
    url = f"{hostile.url}/{route}.d3m"
    with pytest.raises(D3MError, match=message) as err:
        fetch(url)
    assert str(err.value).startswith(url)
    assert leftovers(d3m_cache) == []
    out = run_inspect("check", f"{url}#sha256={DIGEST}", "--allow-download")
    assert out.exit_code == 1 and url in out.stderr and isinstance(out.exception, SystemExit)


def test_an_http_redirect_is_followed(hostile, d3m_cache):
    assert fetch(f"{hostile.url}/to-topk.d3m").read_bytes() == DATA


def test_a_malformed_url_is_a_d3m_error():
    with pytest.raises(D3MError, match="not a valid URL"):
        resolve_archive(f"http://[::1/x.d3m#sha256={DIGEST}", allow_download=True)


def test_sigterm_during_a_download_leaves_no_part_file(hostile, d3m_cache):
    code = ("import sys; from d3mfmt import resolve_archive; from d3mfmt.downloads import DownloadLimits\n"
            "resolve_archive(sys.argv[1], allow_download=True, progress=False,\n"
            "                download_limits=DownloadLimits(timeout_s=30, deadline_s=60))\n")
    env = {**os.environ, "D3MFMT_CACHE_DIR": str(d3m_cache)}
    proc = subprocess.Popen([sys.executable, "-c", code, f"{hostile.url}/slow-body.d3m#sha256={DIGEST}"], env=env,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list((d3m_cache / "archives").glob(".*.part")) if (d3m_cache / "archives").exists() else True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == -signal.SIGTERM  # it still ends as SIGTERM asks
    finally:
        proc.kill()
    assert leftovers(d3m_cache) == []


def test_a_tampered_cache_entry_is_refused_or_fetched_again(hostile, d3m_cache):
    url = f"{hostile.url}/topk.d3m#sha256={DIGEST}"
    cached = resolve_archive(url, allow_download=True)
    other = d3mfmt.save(d3mfmt.load_file(ROOT / "spec" / "vectors" / "onehot.d3m"))
    cached.write_bytes(other)  # another valid archive planted under the pinned name
    with pytest.raises(D3MError, match=f"has sha256 {hashlib.sha256(other).hexdigest()}, not the pinned {DIGEST}"):
        d3mfmt.load_file(url)
    out = run_inspect("summary", url)
    assert out.exit_code == 1 and "not the pinned" in out.stderr
    assert d3mfmt.load_file(url, allow_download=True).content_hash == d3mfmt.load_file(TOPK).content_hash
    assert cached.read_bytes() == DATA


def test_sizes_are_checked_before_hashing(tmp_path):
    sparse = tmp_path / "huge.d3m"
    with open(sparse, "wb") as f:
        f.truncate(16 << 30)  # 16 GiB, no blocks written: hashing it would read them all
    start = time.monotonic()
    with pytest.raises(D3MError, match="exceeds the 4 GiB limit"):
        resolve_archive(sparse, sha256="0" * 64)
    assert time.monotonic() - start < 1
    out = run_inspect("summary", sparse, "--sha256", "0" * 64)
    assert out.exit_code == 1 and "exceeds the 4 GiB limit" in out.stderr
    fifo = tmp_path / "fifo.d3m"
    os.mkfifo(fifo)
    with pytest.raises(D3MError, match="not a regular file"):
        resolve_archive(fifo, sha256="0" * 64)  # would block forever on open or read


def test_load_file_takes_the_download_limits(hostile, d3m_cache):
    url = f"{hostile.url}/slow-body.d3m#sha256={DIGEST}"
    with pytest.raises(D3MError, match="deadline of 0.3 s.*download_limits=d3mfmt.DownloadLimits"):
        d3mfmt.load_file(url, allow_download=True, download_limits=FAST)
    assert leftovers(d3m_cache) == []


def test_a_later_download_sweeps_what_sigkill_left(hostile, d3m_cache):
    root = d3m_cache / "archives"
    root.mkdir(parents=True)
    old, fresh = root / ".x.d3m.abc.part", root / ".y.d3m.def.part"
    old.write_bytes(b"half"), fresh.write_bytes(b"live")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    fetch(f"{hostile.url}/topk.d3m")
    assert not old.exists() and fresh.exists()  # a fresh one may belong to a download in progress
