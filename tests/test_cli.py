"""d3m-inspect as a user runs it: summary, --json, check, the subcommand shape, and bad input without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import members_of, run_inspect, with_member, zip_members

import d3mfmt

ROOT = Path(__file__).resolve().parent.parent
TOPK = ROOT / "spec" / "vectors" / "topk.d3m"


def test_summary_names_what_a_user_needs():
    a = d3mfmt.load_file(TOPK)
    for args in ([TOPK], ["summary", TOPK]):  # summary is the default subcommand
        out = run_inspect(*args)
        assert out.exit_code == 0, out.output
        for text in ["format 1.0", a.content_hash, "10 classes, ipc 2, grid 2x2, 20 images, 80 patches",
                     "0:zero, 1:one", "d3m/tiny-mnist", "DDIMScheduler, 20 steps, guidance 2.0, 64x64 px",
                     "mnist-cnn", "topk k=3 values=u8sqrt", "labels.zst", "tensors.safetensors"]:
            assert text in out.stdout, text
        assert out.stderr == ""


def test_json_matches_the_archive():
    a = d3mfmt.load_file(TOPK)
    for args in ([TOPK, "--json"], ["summary", TOPK, "--json"], ["--json", TOPK]):
        out = run_inspect(*args)
        assert out.exit_code == 0, out.output
        s = json.loads(out.stdout)
        assert s["content_hash"] == a.content_hash
        assert s["dataset"]["patches"] == 80 and s["dataset"]["class_names"][7] == "seven"
        assert s["labels"] == {**s["labels"], "kind": "topk", "k": 3, "values": "u8sqrt", "index_dtype": "uint8"}
        assert "encoding" not in s["labels"]  # the manifest's own name for it
        assert s["file_bytes"] == TOPK.stat().st_size
        assert s["members"]["labels.zst"] == a.manifest.members["labels.zst"].size
        assert list(s["members"]) == ["mimetype", "manifest.json", "tensors.safetensors", "labels.zst"]


def test_check_valid_and_one_line_per_problem(tmp_path):
    ok = run_inspect("check", TOPK)
    assert ok.exit_code == 0 and ok.stdout == f"{TOPK}: valid\n" and ok.stderr == ""
    data = TOPK.read_bytes()
    entries = members_of(data)
    # corrupt both payload members without fixing the manifest: two problems
    bad = with_member(data, "labels.zst", entries[3][1][:-1] + b"\0", fix_hash=False)
    bad = with_member(bad, "tensors.safetensors", entries[2][1][:-1] + b"\1", fix_hash=False)
    path = tmp_path / "bad.d3m"
    path.write_bytes(bad)
    out = run_inspect("check", path)
    assert out.exit_code == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    # the two checksum failures, then what decoding the damaged frame found
    assert "tensors.safetensors: sha256" in lines[0] and "labels.zst: sha256" in lines[1], lines
    assert len(lines) == 3 and "labels.zst: corrupt zstd frame" in lines[2], lines
    assert all(line.startswith(f"{path}: ") for line in lines)


@pytest.mark.parametrize("mode", [[], ["--json"], ["check"]])
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
        args = [*mode, path] if mode == ["check"] else [path, *mode]
        out = run_inspect(*args)
        expected = 2 if path == tmp_path else 1  # click refuses a folder as FILE (a usage error)
        assert out.exit_code == expected and isinstance(out.exception, SystemExit), (path, out.exception)
        assert message in out.stderr and str(path) in out.stderr, (path, out.stderr)  # the file is named
        assert out.stdout == ""


@pytest.mark.parametrize("old, new", [
    (["--check"], "d3m-inspect check FILE"),
    (["--check", "--verify"], "d3m-inspect check FILE"),
    (["--verify"], "d3m-inspect verify FILE"),
    (["--verify-images", "3"], "d3m-inspect verify FILE --images N"),
    (["--preview", "p.png"], "d3m-inspect preview FILE -o OUT.png"),
    (["--export-images", "d"], "d3m-inspect export images FILE -o DIR"),
    (["--export-embeddings", "d"], "d3m-inspect export embeddings FILE -o DIR"),
    (["--card", "d"], "d3m-inspect card FILE -o DIR"),
])
def test_old_mode_flags_are_usage_errors_naming_the_subcommands(old, new, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, wherever an old flag pointed
    for args in ([TOPK, *old], [*old, TOPK]):
        out = run_inspect(*args)
        assert out.exit_code == 2 and out.stdout == "", out.output
        assert f"use `{new}`" in out.stderr, out.stderr
        assert "summary, check, verify, preview, export images, export embeddings, card" in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, owners", [
    ([TOPK, "--tolerance", "300"], "`d3m-inspect verify`"),
    ([TOPK, "--repo-id", "me/x"], "`d3m-inspect card`"),
    ([TOPK, "--unit", "image"], "`d3m-inspect export images`"),
    (["check", TOPK, "--select", "0"], "`d3m-inspect preview`"),
    (["check", TOPK, "--per-class", "2"], "`d3m-inspect preview` or `d3m-inspect card`"),
    (["export", "embeddings", TOPK, "-o", "d", "--model", "x"], "`d3m-inspect verify` or `d3m-inspect preview`"),
    (["verify", TOPK, "--cache-dir", "c"], "`d3m-inspect preview`"),  # verify never reads a pixel cache
])
def test_an_option_without_its_mode_is_a_usage_error(args, owners):
    out = run_inspect(*args)
    assert out.exit_code == 2 and out.stdout == "", out.output
    assert "is not an option of `d3m-inspect" in out.stderr and owners in out.stderr, out.stderr


def test_help_lists_the_subcommands_in_order():
    out = run_inspect("--help")
    assert out.exit_code == 0
    listed = [line.split()[0] for line in out.stdout.split("Commands:")[1].strip().splitlines()]
    assert listed == ["summary", "check", "verify", "preview", "export", "card"]
    assert "[COMMAND] FILE" in out.stdout
    export = run_inspect("export", "--help")
    assert [line.split()[0] for line in export.stdout.split("Commands:")[1].strip().splitlines()] == ["images",
                                                                                                     "embeddings"]
    for command, own in ((["summary"], "--json"), (["check"], "--sha256"), (["verify"], "--tolerance"),
                         (["preview"], "--select"), (["export", "images"], "--unit"), (["card"], "--repo-id")):
        text = run_inspect(*command, "--help").stdout
        assert own in text and "--allow-download" in text and "--allow-unpinned" in text, command


def test_reading_modes_do_not_import_torch():
    """summary, --json and check, run as the console script runs them, in a fresh interpreter."""
    code = (
        "import sys\n"
        "from d3mfmt.cli import inspect_main\n"
        "for args in ([sys.argv[1]], [sys.argv[1], '--json'], ['check', sys.argv[1]]):\n"
        "    try:\n"
        "        inspect_main(args)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (args, exit.code)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(TOPK)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]"
    assert out.stdout.count("golden-topk: 10 classes") == 1 and '"content_hash"' in out.stdout
    assert out.stdout.rstrip().endswith(f"{TOPK}: valid")
