"""Hostile input at the consumer and builder edges (issue 10, part B): the pixel cache, printed names,
devices, teachers, work directories, export folders and the output folder."""

import io
import json
import logging
import os
import textwrap
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU, make_archive, run_inspect
from tiny_teacher import make_imagefolder

import d3mfmt
from builder.assemble import write_archive
from builder.inversion import InversionSettings
from builder.pipeline import build
from builder.settings import BuildSettings, RunOptions
from builder.sources import ImageFolderSource
from builder.teachers import check_teacher_width, resolve_teacher
from builder.workdir import Workdir
from d3mfmt import ClassInfo, D3MDataset, D3MError, RenderOptions
from d3mfmt.manifest import generator_to_dict
from d3mfmt.terminal import printable

ESC, RLO = "\x1b[2J\x1b]0;pwned\x07", "\u202e"  # clear screen + set title; right-to-left override


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder nobody here can create files in: chmod 555 for a normal user; /sys for root."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys")
    if not folder.is_dir() or os.access(folder, os.W_OK) and _can_create(folder):
        pytest.skip("no folder here refuses writes to root")
    yield folder


def _can_create(folder: Path) -> bool:
    try:
        (folder / ".d3m-probe").touch()
    except OSError:
        return False
    (folder / ".d3m-probe").unlink()
    return True


# -- the pixel cache --------------------------------------------------------


@pytest.fixture
def ds(tiny_archive_path, tmp_path):
    return D3MDataset(tiny_archive_path, cache_dir=tmp_path / "cache", render=CPU)


def _fresh(ds):
    return D3MDataset(ds.path, cache_dir=ds.cache_dir, render=CPU)


def test_same_size_corruption_and_zeroed_pixels_are_rendered_again(ds):
    x = ds.render_images([0])[0]
    path = ds.pixel_cache.path(0, 0)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # one pixel off by one level: same size, same header
    zeroed = good[: len(good) - 3 * 32 * 32 - 32] + bytes(3 * 32 * 32) + good[-32:]
    plain = io.BytesIO()
    np.save(plain, np.zeros((3, 32, 32), np.uint8))  # a well-formed .npy of the right shape, all zeros
    for bad in (bytes(flipped), zeroed, plain.getvalue(), bytes(len(good))):
        path.write_bytes(bad)
        fresh = _fresh(ds)
        assert fresh.pixel_cache.read(0, 0) is None
        assert torch.equal(fresh.render_images([0])[0], x)
        assert path.read_bytes() == good  # the bad entry was replaced by a good one


def test_a_huge_declared_shape_is_never_allocated(ds):
    ds.render_images([1])
    path = ds.pixel_cache.path(0, 1)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (3, 200000, 200000)})
    path.write_bytes(buf.getvalue() + bytes(64))
    fresh = _fresh(ds)
    assert fresh.pixel_cache.read(0, 1) is None
    assert fresh.render_images([1])[1].shape == (3, 32, 32)


def test_a_fifo_in_the_cache_does_not_hang(ds):
    path = ds.pixel_cache.path(0, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    assert ds.pixel_cache.read(0, 2) is None
    assert ds.render_images([2])[2].shape == (3, 32, 32)  # rendered; the write replaces the FIFO
    assert path.is_file()


def test_a_planted_file_with_a_recomputed_sha256_is_not_served(ds, tmp_path):
    import hashlib

    x = ds.render_images([0, 1])[0]
    path = ds.pixel_cache.path(0, 0)
    good = path.read_bytes()
    header = good[: len(good) - 3 * 32 * 32 - 32]
    # 1. other pixels with the sha256 of their bytes: what the old unkeyed layout accepted
    body = header + np.full((3, 32, 32), 200, np.uint8).tobytes()
    planted = {"recomputed sha256": body + hashlib.sha256(body).digest()}
    # 2. a genuine file of another slot, and one of another cache root (another key) in this slot
    planted["another image's genuine file"] = ds.pixel_cache.path(0, 1).read_bytes()
    other = D3MDataset(ds.path, cache_dir=tmp_path / "other-root", render=CPU)
    other.render_images([0])
    planted["another cache's genuine file"] = other.pixel_cache.path(0, 0).read_bytes()
    assert planted["another cache's genuine file"] != good  # same pixels, another key
    for what, blob in planted.items():
        path.write_bytes(blob)
        fresh = _fresh(ds)
        assert fresh.pixel_cache.read(0, 0) is None, what
        assert torch.equal(fresh.render_images([0])[0], x), what  # rendered again, and the file replaced
        assert path.read_bytes() == good, what


def test_a_verified_file_is_hashed_once_per_process_and_rechecked_when_changed(ds, monkeypatch):
    import hmac

    from d3mfmt import pixelcache

    ds.render_images([0])
    calls = []
    real_new = hmac.new
    monkeypatch.setattr(pixelcache.hmac, "new", lambda *a, **k: calls.append(1) or real_new(*a, **k))
    fresh = _fresh(ds)
    fresh.memory_cache_bytes = 0  # every read goes to the file
    first = fresh.pixel_cache.read(0, 0).copy()
    for _ in range(3):
        assert (fresh.pixel_cache.read(0, 0) == first).all()
    assert len(calls) == 1  # verified once, then only read
    # the same size and mtime, changed in place: ctime moves, so the file is checked again and refused
    path = fresh.pixel_cache.path(0, 0)
    st = path.stat()
    blob = bytearray(path.read_bytes())
    blob[200] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(blob)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fresh.pixel_cache.read(0, 0) is None and len(calls) == 2


def test_a_bad_key_file_is_a_clear_error(ds):
    from d3mfmt.pixelcache import KEY_FILE

    ds.render_images([0])
    (ds.cache_dir / KEY_FILE).write_bytes(b"short")
    with pytest.raises(D3MError, match=r"is not a pixel-cache key \(5 bytes, expected 32\); delete it"):
        _fresh(ds)[0]


def test_concurrent_first_writers_agree_on_one_key(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from d3mfmt.pixelcache import KEY_FILE, cache_secret

    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: cache_secret(tmp_path / "root", create=True), range(32)))
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [KEY_FILE]  # no temporary files left
    assert cache_secret(tmp_path / "elsewhere", create=False) is None


@pytest.mark.parametrize("where", ["unwritable folder", "a file"])
def test_an_unwritable_cache_keeps_images_in_memory_with_one_warning(tiny_archive_path, tmp_path, unwritable_dir,
                                                                     where):
    cache = unwritable_dir / "d3m-cache" if where == "unwritable folder" else tmp_path / "file"
    if where == "a file":
        cache.write_bytes(b"not a folder")
    reference = D3MDataset(tiny_archive_path, cache_dir=tmp_path / "ok", render=CPU)
    ds = D3MDataset(tiny_archive_path, cache_dir=cache, render=CPU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[k] for k in (0, 20, 40)]  # three images of three classes: three failed writes
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "cannot be written" in messages[0] and "cache_dir" in messages[0], messages
    for k, (x, _, _) in zip((0, 20, 40), items):
        assert torch.equal(x, reference[k][0])


def test_the_cache_key_follows_the_transformers_version(ds, monkeypatch):
    import transformers

    before = ds.image_cache_dir
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert _fresh(ds).image_cache_dir != before


# -- names printed to a terminal -------------------------------------------


def test_printable_escapes_controls_and_keeps_letters():
    assert printable("seven") == "seven" and printable("café 七") == "café 七"
    assert printable("a" + ESC) == "a\\x1b[2J\\x1b]0;pwned\\x07"
    assert printable(RLO + "gnp.exe") == "\\u202egnp.exe"
    assert printable("x\ud800y\n\x9b") == "x\\ud800y\\x0a\\x9b"


def _hostile_archive(tmp_path, filename="hostile.d3m") -> Path:
    a = make_archive()
    ds = a.manifest.dataset
    classes = (ClassInfo("n01" + ESC, "evil" + ESC), ClassInfo("n02", RLO + "txt.exe"), ds.classes[2])
    a = replace(a, manifest=replace(a.manifest, dataset=replace(ds, name="set" + ESC, classes=classes)))
    path = tmp_path / filename
    d3mfmt.save_file(a, path)
    return path


def _no_controls(text: str) -> bool:
    return "\x1b" not in text and "\x07" not in text and RLO not in text


def test_summary_check_and_verify_lines_escape_terminal_controls(tmp_path):
    path = _hostile_archive(tmp_path)
    summary = run_inspect(path)
    assert summary.exit_code == 0, summary.output
    assert _no_controls(summary.stdout) and "evil\\x1b[2J" in summary.stdout and "\\u202etxt.exe" in summary.stdout
    named = _hostile_archive(tmp_path, "bad" + ESC + ".d3m")
    assert _no_controls(run_inspect("check", named).output)
    named.write_bytes(named.read_bytes()[:-40])  # a broken archive under that name: the problem lines
    broken = run_inspect("check", named)
    assert broken.exit_code == 1 and _no_controls(broken.stderr) and "bad\\x1b[2J" in broken.stderr
    from d3mfmt.verify import VerifyReport

    lines = VerifyReport([(0, 0)], np.array([3]), 8).lines(["evil" + ESC])
    assert _no_controls("\n".join(lines)) and "evil\\x1b" in lines[0]


def test_class_folder_names_with_terminal_escapes_are_refused_escaped(tiny_model, tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=("a_red" + ESC, "b_green", "c_blue"), per_class=2)
    with pytest.raises(D3MError, match="holds the character U\\+001B") as info:
        build(ImageFolderSource(data), _settings(tiny_model, inversion=InversionSettings(steps=1, batch=2)),
              tmp_path / "wd", run=RunOptions(shard=(0, 3), device="cpu", progress=False))
    assert "a_red\\x1b[2J" in str(info.value) and _no_controls(str(info.value))
    assert not (tmp_path / "wd").exists()


# -- d3m-inspect arguments and devices -------------------------------------


def test_nonpositive_counts_and_bad_tolerance_are_messages(tiny_archive_path, tmp_path):
    for per_class in ("-1", "0", "33"):
        out = run_inspect("preview", tiny_archive_path, "-o", tmp_path / "p.png", "--per-class", per_class)
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.exception
        assert "--per-class" in out.stderr and "must be an integer in 1..32" in out.stderr
    assert not (tmp_path / "p.png").exists()
    odd = run_inspect("preview", tiny_archive_path, "-o", tmp_path / "grid.foo", "--per-class", "1")
    assert odd.exit_code == 0, odd.output  # PNG whatever the suffix (PIL raised "unknown file extension")
    assert (tmp_path / "grid.foo").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for tolerance in ("-1", "256"):
        out = run_inspect("verify", tiny_archive_path, "--tolerance", tolerance)
        assert out.exit_code == 1 and "--tolerance) must be in 0..255" in out.stderr
    out = run_inspect("verify", tiny_archive_path, "--images", "0")
    assert out.exit_code == 1 and "--images) must be a positive integer, got 0" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_or_bogus_device_is_a_message_before_any_work(tiny_archive_path, tmp_path):
    for device, message in (("cuda", "cuda is not available"), ("bogus", "not a rendering device")):
        for mode in (["verify"], ["export", "images", "-o", tmp_path / "imgs"], ["preview", "-o", tmp_path / "p.png"],
                     ["card", "-o", tmp_path / "card"]):
            out = run_inspect(*mode, tiny_archive_path, "--device", device)
            assert out.exit_code == 1 and isinstance(out.exception, SystemExit), (mode, out.exception)
            assert message in out.stderr
    assert not (tmp_path / "imgs").exists() and not (tmp_path / "p.png").exists() and not (tmp_path / "card").exists()
    with pytest.raises(D3MError, match="not a rendering device"):
        D3MDataset(tiny_archive_path, render=RenderOptions(device="bogus"))


def test_a_failed_export_leaves_no_folder(tiny_archive_path, tmp_path):
    out = run_inspect("export", "images", tiny_archive_path, "-o", tmp_path / "imgs", "--model", tmp_path / "no-model",
                      "--cache-dir", tmp_path / "cache")
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.exception
    assert not (tmp_path / "imgs").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder either
    out = run_inspect("export", "images", tiny_archive_path, "-o", tmp_path / "new" / "deeper" / "imgs", "--model",
                      tmp_path / "no-model")
    assert out.exit_code == 1 and not (tmp_path / "new").exists()  # parents it made are gone too
    (tmp_path / "mine").mkdir()  # an empty folder the user made stays, empty
    out = run_inspect("export", "images", tiny_archive_path, "-o", tmp_path / "mine", "--model", tmp_path / "no-model")
    assert out.exit_code == 1 and list((tmp_path / "mine").iterdir()) == []
    ok = run_inspect("export", "images", tiny_archive_path, "-o", tmp_path / "mine", "--cache-dir", tmp_path / "cache")
    assert ok.exit_code == 0, ok.output
    assert len(list((tmp_path / "mine").rglob("*.png"))) == 48


# -- teachers ----------------------------------------------------------------

TEACHERS = {
    "syntax_error": "def build(:\n",
    "import_error": "raise RuntimeError('no GPU driver')\n",
    "factory_raises": "def build():\n    raise OSError('weights.pt not found')\n",
    "returns_tuple": """
        import torch
        class M(torch.nn.Module):
            def forward(self, x):
                return x.mean(dim=(2, 3)), None
        def build():
            return M()
        """,
    "int_logits": """
        import torch
        class M(torch.nn.Module):
            def forward(self, x):
                return x.mean(dim=(2, 3)).long()
        def build():
            return M()
        """,
    "one_channel": """
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        """,
}


@pytest.mark.parametrize("name, match", [
    ("syntax_error", "importing 'tt_syntax_error' failed: SyntaxError"),
    ("import_error", "importing 'tt_import_error' failed: RuntimeError: no GPU driver"),
    ("factory_raises", "the factory raised OSError: weights.pt not found"),
    ("returns_tuple", "returns tuple, expected one float tensor of logits"),
    ("int_logits", "returns a torch.int64 tensor, expected one float tensor"),
    ("one_channel", r"fails on a batch of shape \(1, 3, 16, 16\).*RGB"),
    ("missing", "has no function 'nope'"),
])
def test_broken_teachers_are_one_message(tmp_path, monkeypatch, name, match):
    for key, source in TEACHERS.items():
        (tmp_path / f"tt_{key}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "tt_syntax_error:nope" if name == "missing" else f"tt_{name}:build"
    if name == "missing":
        (tmp_path / "tt_syntax_error.py").write_text("x = 1\n")
    with pytest.raises(D3MError, match=match):
        model, _ = resolve_teacher(spec)
        check_teacher_width(model, 3, 16, "cpu")


# -- work directories and the output folder ----------------------------------


def _settings(model_dir, **kw) -> BuildSettings:
    base = dict(model=str(model_dir), teacher="tiny_teacher:build_teacher", ipc=2, grid=2, steps=2, guidance_scale=2.0,
                prompt_template="a photo of {token}", inversion=InversionSettings(steps=4, batch=4))
    return BuildSettings(**{**base, **kw})


def _finished_workdir(path: Path) -> Workdir:
    """A work directory whose three classes are finished, written through Workdir's own API."""
    a, s = make_archive(num_classes=3, ipc=2, grid=2), BuildSettings(model="m", teacher="t", ipc=2, grid=2)
    wd = Workdir(path)
    wd.bind({"settings": s.to_json(), "classes": [asdict(c) for c in a.manifest.dataset.classes],
             "source": {"name": "test", "fingerprint": None, "license": None},
             "generator": generator_to_dict(a.manifest.generator), "teacher": {"name": "t", "identity": None}})
    rng = np.random.default_rng(0)
    for c in range(3):
        probs = rng.dirichlet(np.ones(3), 8).astype(np.float32)
        wd.save_class(c, {"embedding": rng.normal(size=(1, 8)).astype(np.float32), "seeds": np.arange(2) + 10 * c,
                          "probs": probs, "fingerprints": np.zeros((2, 4, 4), np.uint8)},
                      {"regenerated": 0.5, "seconds": {"select": 0.0}})
    return wd


def _merge(wd: Workdir, out: Path):
    from click.testing import CliRunner

    from builder.cli import main

    return CliRunner().invoke(main, ["merge", str(wd.path), "-o", str(out)])


def test_merge_over_a_damaged_work_directory_names_the_file(tmp_path):
    wd = _finished_workdir(tmp_path / "wd")
    assert _merge(wd, tmp_path / "ok.d3m").exit_code == 0
    checkpoint, good = wd.class_file(1), wd.class_file(1).read_bytes()
    damaged = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00" * 64,
        "wrong shape": None,
    }
    for kind, blob in damaged.items():
        if blob is None:
            checkpoint.write_bytes(good)
            tensors, meta = wd.load_class(1)
            wd.save_class(1, {**tensors, "probs": tensors["probs"][:3]}, meta)
        else:
            checkpoint.write_bytes(blob)
        out = _merge(wd, tmp_path / "x.d3m")
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), (kind, out.exception)
        assert "000001.safetensors" in out.stderr and "delete it" in out.stderr, (kind, out.stderr)
        assert not (tmp_path / "x.d3m").exists()
    checkpoint.write_bytes(good)
    settings = wd.path / "settings.json"
    for blob in (b"{not json", b"[1, 2]", json.dumps({"settings": {}}).encode(), b"\xff\xfe"):
        settings.write_bytes(blob)
        out = _merge(wd, tmp_path / "x.d3m")
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), (blob, out.exception)
        assert "settings.json is damaged" in out.stderr
    assert not (tmp_path / "x.d3m").exists()


def test_an_unwritable_output_folder_fails_before_any_class(tiny_model, tmp_path, unwritable_dir):
    data = make_imagefolder(tmp_path / "data", per_class=2)
    out = unwritable_dir / "x.d3m"
    with pytest.raises(D3MError, match=r"cannot write in .*choose an output folder"):
        build(ImageFolderSource(data), _settings(tiny_model), tmp_path / "wd", run=RunOptions(device="cpu", progress=False),
              out=out)
    assert not (tmp_path / "wd").exists()  # nothing was started
    wd = _finished_workdir(tmp_path / "wd2")
    with pytest.raises(D3MError, match="cannot write in"):
        write_archive([wd.path], out, d3mfmt.LabelEncoding(), "x")
    with pytest.raises(D3MError, match="is a folder"):
        write_archive([wd.path], tmp_path, d3mfmt.LabelEncoding(), "x")
