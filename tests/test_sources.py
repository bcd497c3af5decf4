"""Archives by hf:// id (from a Hugging Face cache the test lays out) and by sha256-pinned URL
(from a local http.server on 127.0.0.1); no network."""

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
from conftest import CPU, run_inspect

import d3mfmt
from d3mfmt import D3MError, RenderOptions, resolve_archive
from d3mfmt import downloads

ROOT = Path(__file__).resolve().parent.parent
TOPK = ROOT / "spec" / "vectors" / "topk.d3m"
DATA = TOPK.read_bytes()
DIGEST = hashlib.sha256(DATA).hexdigest()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def d3m_cache(tmp_path, monkeypatch):
    """d3mfmt's caches under tmp_path, so nothing is read from or left in the user's."""
    cache = tmp_path / "d3m-cache"
    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache under tmp_path (env and the already-imported constant)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def place_in_hf_cache(cache: Path, repo: str, filename: str, data: bytes, commit: str = COMMIT,
                      refs=("main",)) -> Path:
    """Lay a dataset file out as huggingface_hub does: blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/<ref>."""
    root = cache / ("datasets--" + repo.replace("/", "--"))
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = root / "snapshots" / commit / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir()
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return link


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# -- hf:// ids -------------------------------------------------------------------


def test_hub_id_loads_from_the_local_cache_with_and_without_revision(hf_cache):
    link = place_in_hf_cache(hf_cache, "org/mnist-d3m", "sets/topk.d3m", DATA, refs=("main", "v1"))
    expected = d3mfmt.load_file(TOPK).content_hash
    for ref in ["hf://datasets/org/mnist-d3m/sets/topk.d3m",
                f"hf://datasets/org/mnist-d3m@{COMMIT}/sets/topk.d3m",
                "hf://datasets/org/mnist-d3m@v1/sets/topk.d3m"]:
        assert resolve_archive(ref) == link
        assert d3mfmt.load_file(ref).content_hash == expected


def test_hub_id_not_cached_says_how_to_download_it(hf_cache):
    place_in_hf_cache(hf_cache, "org/mnist-d3m", "topk.d3m", DATA)
    with pytest.raises(D3MError) as err:
        d3mfmt.load_file("hf://datasets/org/mnist-d3m@v2/other.d3m")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and str(hf_cache) in message
    assert "hf download --repo-type dataset org/mnist-d3m other.d3m --revision v2" in message
    assert "allow_download=True" in message and "--allow-download" in message
    # allowed, but HF_HUB_OFFLINE (set for the whole suite) forbids it: say so instead
    with pytest.raises(D3MError, match="HF_HUB_OFFLINE is set"):
        resolve_archive("hf://datasets/org/mnist-d3m/missing.d3m", allow_download=True)


def test_hub_id_stays_offline_by_default_even_without_hf_hub_offline(hf_cache, server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # a hub that would answer (and count) any request
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    link = place_in_hf_cache(hf_cache, "org/mnist-d3m", "topk.d3m", DATA)
    assert resolve_archive("hf://datasets/org/mnist-d3m/topk.d3m") == link
    with pytest.raises(D3MError, match="allow_download=True"):
        resolve_archive("hf://datasets/org/mnist-d3m/other.d3m")
    # (huggingface_hub itself may fetch /api/agent-harnesses for its user agent; no file is asked for)
    assert [r for r in server.requests if "mnist-d3m" in r] == []


@pytest.mark.parametrize("ref", ["hf://org/name/x.d3m", "hf://datasets/org/x.d3m", "hf://datasets/org/name/",
                                 "hf://datasets/org/name/../x.d3m", "ftp://host/x.d3m"])
def test_malformed_references_are_named(ref):
    with pytest.raises(D3MError, match="hf://datasets/ORG/NAME"):
        resolve_archive(ref)


def test_dataset_and_inspect_accept_hub_ids(hf_cache):
    from d3mfmt import D3MDataset

    link = place_in_hf_cache(hf_cache, "org/mnist-d3m", "topk.d3m", DATA)
    ds = D3MDataset("hf://datasets/org/mnist-d3m/topk.d3m", render=CPU)
    assert ds.path == link and len(ds) == 80 and ds.classes[7] == "seven"
    out = run_inspect("hf://datasets/org/mnist-d3m/topk.d3m")
    assert out.exit_code == 0 and "golden-topk: 10 classes" in out.stdout, out.output
    assert run_inspect("check", "hf://datasets/org/mnist-d3m/topk.d3m").stdout.endswith(": valid\n")
    out = run_inspect("hf://datasets/org/other/topk.d3m")
    assert out.exit_code == 1 and "--allow-download" in out.stderr and isinstance(out.exception, SystemExit)


def test_dataset_passes_the_same_switch_to_model_resolution(hf_cache):
    from d3mfmt import D3MDataset

    with pytest.raises(D3MError, match="allow_download=True"):
        D3MDataset(TOPK, render=RenderOptions(model="org/not-cached", device="cpu")).image_cache_dir
    # allowed: the model would be fetched, and HF_HUB_OFFLINE (set for the suite) is what stops it
    allowed = RenderOptions(model="org/not-cached", device="cpu", allow_download=True)
    with pytest.raises(D3MError, match="HF_HUB_OFFLINE is set"):
        D3MDataset(TOPK, render=allowed).regenerator


def test_sha256_checks_a_local_file_too():
    assert resolve_archive(TOPK, sha256=DIGEST) == TOPK
    assert resolve_archive(TOPK, sha256="sha256:" + DIGEST.upper()) == TOPK
    with pytest.raises(D3MError, match="does not match the expected"):
        d3mfmt.load_file(TOPK, sha256="0" * 64)
    with pytest.raises(D3MError, match="64 hex digits"):
        resolve_archive(TOPK, sha256="abc")


# -- pinned URLs -------------------------------------------------------------------


class Server:
    """A local HTTP server in a thread: path -> (status, body, declared length or None); counts requests."""

    def __init__(self, routes: dict):
        self.routes, self.requests = routes, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 5  # a stuck client cannot hold the thread

            def do_GET(self, head=False):  # noqa: N802 (http.server's name)
                owner.requests.append(self.path)
                status, body, length = owner.routes.get(self.path, (404, b"", 0))
                self.send_response(status)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                if not head:
                    self.wfile.write(body)  # HTTP/1.0: the connection closes after the handler

            def do_HEAD(self):  # noqa: N802
                self.do_GET(head=True)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.guard = threading.Timer(60, self.httpd.shutdown)  # stops itself even if a test hangs

    def __enter__(self):
        self.thread.start()
        self.guard.start()
        return self

    def __exit__(self, *exc):
        self.guard.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    routes = {
        "/topk.d3m": (200, DATA, len(DATA)),
        "/no-length.d3m": (200, DATA, None),
        "/short.d3m": (200, DATA[: len(DATA) // 2], len(DATA)),  # server closes mid-body
        "/huge.d3m": (200, b"", downloads.MAX_DOWNLOAD_BYTES + 1),
    }
    with Server(routes) as s:
        yield s


def test_pinned_url_downloads_once_and_then_loads_from_the_cache(server, d3m_cache):
    url = f"{server.url}/topk.d3m#sha256={DIGEST}"
    with pytest.raises(D3MError, match="allow_download=True"):
        d3mfmt.load_file(url)  # offline by default, like models
    assert server.requests == []
    archive = d3mfmt.load_file(url, allow_download=True)
    assert archive.content_hash == d3mfmt.load_file(TOPK).content_hash
    cached = d3m_cache / "archives" / DIGEST / "topk.d3m"
    assert files_under(d3m_cache) == [cached] and cached.read_bytes() == DATA
    assert server.requests == ["/topk.d3m"]
    # the second load, by fragment or by argument, does not touch the server
    assert resolve_archive(url) == cached
    assert resolve_archive(f"{server.url}/topk.d3m", sha256=DIGEST, allow_download=True) == cached
    assert d3mfmt.load_file(url, allow_download=True).content_hash == archive.content_hash
    assert server.requests == ["/topk.d3m"]


def test_wrong_hash_is_an_error_and_caches_nothing(server, d3m_cache):
    with pytest.raises(D3MError, match="does not match the pinned"):
        resolve_archive(f"{server.url}/topk.d3m#sha256={'0' * 64}", allow_download=True)
    assert server.requests == ["/topk.d3m"] and files_under(d3m_cache) == []


@pytest.mark.parametrize("path, message", [("/short.d3m", "transfer incomplete"), ("/missing.d3m", "HTTP 404")])
def test_failed_transfer_leaves_nothing_behind(server, d3m_cache, path, message):
    with pytest.raises(D3MError, match=message):
        resolve_archive(f"{server.url}{path}#sha256={DIGEST}", allow_download=True)
    assert files_under(d3m_cache) == []


def test_download_is_bounded(server, d3m_cache, monkeypatch):
    with pytest.raises(D3MError, match="announces .* more than a .d3m may hold"):
        resolve_archive(f"{server.url}/huge.d3m#sha256={DIGEST}", allow_download=True)
    monkeypatch.setattr(downloads, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(D3MError, match="more than 1000 bytes"):
        resolve_archive(f"{server.url}/no-length.d3m#sha256={DIGEST}", allow_download=True)
    assert files_under(d3m_cache) == []


def test_unpinned_url_needs_an_explicit_opt_out(server, d3m_cache):
    url = f"{server.url}/no-length.d3m"
    with pytest.raises(D3MError, match="#sha256=.*allow_unpinned=True"):
        resolve_archive(url, allow_download=True)
    assert server.requests == []
    path = resolve_archive(url, allow_download=True, allow_unpinned=True)
    assert path == d3m_cache / "archives" / DIGEST / "no-length.d3m" and path.read_bytes() == DATA
    with pytest.raises(D3MError, match="disagree"):
        resolve_archive(f"{url}#sha256={DIGEST}", sha256="1" * 64)


def test_dataset_and_inspect_accept_pinned_urls(server, d3m_cache, tmp_path):
    from d3mfmt import D3MDataset

    url = f"{server.url}/topk.d3m#sha256={DIGEST}"
    out = run_inspect(f"{server.url}/topk.d3m")
    assert out.exit_code == 1 and "--allow-unpinned" in out.stderr and isinstance(out.exception, SystemExit)
    out = run_inspect(url, "--allow-download")
    assert out.exit_code == 0 and "golden-topk: 10 classes" in out.stdout, out.output
    assert server.requests == ["/topk.d3m"]
    out = run_inspect("export", "embeddings", f"{server.url}/topk.d3m", "--sha256", DIGEST, "-o", tmp_path / "emb")
    assert out.exit_code == 0 and len(list((tmp_path / "emb").iterdir())) == 10, out.output  # cached: no fetch
    ds = D3MDataset(url, render=CPU)  # now cached: no download switch needed
    assert ds.path == d3m_cache / "archives" / DIGEST / "topk.d3m" and len(ds) == 80
    assert server.requests == ["/topk.d3m"]
