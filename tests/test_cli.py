"""d3m-inspect as a user runs it: summary, --json, --check, and bad input without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import members_of, with_member, zip_members

import d3mfmt

ROOT = Path(__file__).resolve().parent.parent
TOPK = ROOT / "spec" / "vectors" / "topk.d3m"


def inspect(*args):
    cmd = [sys.executable, "-c", "from d3mfmt.cli import inspect_main; inspect_main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_summary_names_what_a_user_needs():
    out = inspect(TOPK)
    assert out.returncode == 0, out.stderr
    a = d3mfmt.load_file(TOPK)
    for text in ["format 1.0", a.content_hash, "10 classes, ipc 2, grid 2x2, 20 images, 80 patches",
                 "0:zero, 1:one", "d3m/tiny-mnist", "DDIMScheduler, 20 steps, guidance 2.0, 64x64 px",
                 "mnist-cnn", "topk k=3 values=u8sqrt", "labels.zst", "tensors.safetensors"]:
        assert text in out.stdout, text
    assert out.stderr == ""


def test_json_matches_the_archive():
    out = inspect(TOPK, "--json")
    s = json.loads(out.stdout)
    a = d3mfmt.load_file(TOPK)
    assert s["content_hash"] == a.content_hash
    assert s["dataset"]["patches"] == 80 and s["dataset"]["class_names"][7] == "seven"
    assert s["labels"] == {**s["labels"], "encoding": "topk", "k": 3, "values": "u8sqrt", "index_dtype": "uint8"}
    assert s["file_bytes"] == TOPK.stat().st_size
    assert s["members"]["labels.zst"] == a.manifest.members["labels.zst"].size
    assert list(s["members"]) == ["mimetype", "manifest.json", "tensors.safetensors", "labels.zst"]


def test_check_valid_and_one_line_per_problem(tmp_path):
    ok = inspect(TOPK, "--check")
    assert ok.returncode == 0 and "valid" in ok.stdout
    data = TOPK.read_bytes()
    entries = members_of(data)
    # corrupt both payload members without fixing the manifest: two problems
    bad = with_member(data, "labels.zst", entries[3][1][:-1] + b"\0", fix_hash=False)
    bad = with_member(bad, "tensors.safetensors", entries[2][1][:-1] + b"\1", fix_hash=False)
    path = tmp_path / "bad.d3m"
    path.write_bytes(bad)
    out = inspect(path, "--check")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    # the two checksum failures, then what decoding the damaged frame found
    assert "tensors.safetensors: sha256" in lines[0] and "labels.zst: sha256" in lines[1], lines
    assert len(lines) == 3 and "labels.zst: corrupt zstd frame" in lines[2], lines
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("mode", [[], ["--json"], ["--check"]])
def test_bad_inputs_exit_nonzero_without_traceback(tmp_path, mode):
    (tmp_path / "empty.d3m").write_bytes(b"")
    (tmp_path / "random.d3m").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "trunc.d3m").write_bytes(TOPK.read_bytes()[:1500])
    entries = members_of(TOPK.read_bytes())
    entries[1] = ("manifest.json", b'{"format": "d3m", "version": "9.0"}')
    (tmp_path / "future.d3m").write_bytes(zip_members(entries))
    cases = {
        tmp_path / "missing.d3m": "no such file",
        tmp_path: "is a directory",
        tmp_path / "empty.d3m": "not a .d3m archive",
        tmp_path / "random.d3m": "not a .d3m archive",
        tmp_path / "trunc.d3m": "truncated",
        tmp_path / "future.d3m": "major version 9 is not supported",
    }
    for path, message in cases.items():
        out = inspect(path, *mode)
        assert out.returncode != 0, path
        assert message in out.stderr, (path, out.stderr)
        assert "Traceback" not in out.stderr
        assert out.stdout == ""
