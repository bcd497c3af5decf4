"""Scale-out: the preflight once per build (lock file), --min-agreement under torchrun, shards that finish."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_build_settings
from tiny_teacher import make_digit_folder, make_imagefolder

import d3mfmt
from builder import once, sources
from builder.cli import main
from builder.once import compute_once
from builder.pipeline import build
from builder.settings import RunOptions
from builder.sources import ImageFolderSource
from builder.workdir import Workdir
from d3mfmt import D3MError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def decodes(monkeypatch):
    """Every image decode of the builder, counted (the real decoder runs)."""
    calls = []
    real = sources.open_image
    monkeypatch.setattr(sources, "open_image", lambda path, side: calls.append(path) or real(path, side))
    return calls


def test_the_preflight_runs_once_per_build(tiny_model, tmp_path, decodes, caplog):
    data = make_imagefolder(tmp_path / "data")  # 3 classes x 6 images
    settings, wd = tiny_build_settings(tiny_model), tmp_path / "wd"
    caplog.set_level(logging.INFO, logger="d3m-build")
    # 1. the first process: one pass decodes every image once (data check and class-order sample), then its class
    build(ImageFolderSource(data), settings, wd, run=RunOptions(shard=(0, 3), device="cpu", progress=False))
    assert len(decodes) == 18 + 6 and len(set(decodes[:18])) == 18
    assert "preflight: 3 classes checked (18 images decoded)" in caplog.text
    # 2. another rank, or a restart: the stored preflight, no decode but its own class's patch selection
    decodes.clear()
    caplog.clear()
    build(ImageFolderSource(data), settings, wd, run=RunOptions(shard=(1, 3), device="cpu", progress=False))
    assert "preflight: reusing" in caplog.text and "no image decoded again" in caplog.text
    assert sorted(p.name for p in decodes) == [f"{i:03d}.png" for i in range(6)]
    assert {p.parent.name for p in decodes} == {"b_green"}  # class 1 only: patch selection
    # 3. the data changed (a file added): the preflight is done again, and the work directory refuses the new data
    (data / "c_blue" / "006.png").write_bytes((data / "c_blue" / "000.png").read_bytes())
    decodes.clear()
    with pytest.raises(D3MError, match="holds a build with other settings or data"):
        build(ImageFolderSource(data), settings, wd, run=RunOptions(shard=(2, 3), device="cpu", progress=False))
    assert len(decodes) == 19


def test_the_preflight_source_digest_is_the_sources_own(tiny_build, image_folder):
    record = json.loads((tiny_build.workdir / "settings.json").read_text())
    assert record["source"]["fingerprint"] == ImageFolderSource(image_folder).info().fingerprint


def test_compute_once_computes_once_for_concurrent_callers(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        time.sleep(0.3)
        return {"v": 1}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: compute_once(tmp_path, "x", {"k": 1}, compute), range(4)))
    assert len(calls) == 1 and [value for value, _ in results] == [{"v": 1}] * 4
    assert sorted(reused for _, reused in results) == [False, True, True, True]
    assert not (tmp_path / "x.lock").exists()
    assert compute_once(tmp_path, "x", {"k": 2}, lambda: {"v": 2}) == ({"v": 2}, False)  # another key: again


def test_compute_once_breaks_the_lock_of_a_holder_that_is_gone(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "x.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "t"}))
    assert compute_once(tmp_path, "x", {"k": 1}, lambda: {"v": 1}) == ({"v": 1}, False)
    assert "breaking the stale lock" in caplog.text
    # a holder on another node that stopped its heartbeat long ago
    (tmp_path / "y.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t"}))
    old = time.time() - once.STALE_AFTER_S - 5
    os.utime(tmp_path / "y.lock", (old, old))
    assert compute_once(tmp_path, "y", {"k": 1}, lambda: {"v": 3}) == ({"v": 3}, False)


def test_a_failed_computation_stores_nothing_and_frees_the_lock(tmp_path):
    def broken():
        raise D3MError("unreadable image x.png")

    with pytest.raises(D3MError, match="unreadable image"):
        compute_once(tmp_path, "x", {"k": 1}, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "x.json").write_text("{not json")  # damaged: computed again, with a warning
    assert compute_once(tmp_path, "x", {"k": 1}, lambda: {"v": 1}) == ({"v": 1}, False)


def test_torchrun_two_ranks_finish_every_class_and_the_merge_names_the_low_one(tmp_path):
    """The built-in model renders the digit a class is named after; folder 'two' is named 'zero', so its
    renders are zeros: the teacher agrees with class 2 on none of them, with classes 0 and 1 on most."""
    data = make_digit_folder(tmp_path / "digits")
    (tmp_path / "classes.txt").write_text("zero\none\ntwo\tzero\n")
    out = tmp_path / "digits.d3m"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "builder.cli", str(data), "-o", str(out), "--model", "d3m/tiny-mnist",
           "--teacher", "tiny_teacher:build_digit_teacher", "--classes", str(tmp_path / "classes.txt"),
           "--ipc", "1", "--ti-steps", "0", "--device", "cpu", "--shard", "auto", "--min-agreement", "0.5"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    # 1. both ranks finish (exit 0): every class is built, the low one recorded and reported by its rank
    assert run.returncode == 0, run.stderr[-4000:]
    wd = Workdir(out.with_name("digits.d3m.work"), create=False)
    agreement = [wd.load_class(c)[1]["regenerated"] for c in range(3)]
    assert agreement[0] >= 0.5 and agreement[1] >= 0.5 and agreement[2] < 0.5, agreement
    assert run.stderr.count("1 of this shard's 2 classes are below --min-agreement 0.5: two 'zero'") == 1
    assert not out.exists()
    # 2. one preflight for the build: one rank computed it, the other waited for it or found it
    assert run.stderr.count("preflight: 3 classes checked (24 images decoded)") == 1
    assert run.stderr.count("preflight: reusing") == 1
    # 3. the threshold is enforced once, at the merge, naming the class and what to do
    merged = CliRunner().invoke(main, ["merge", str(wd.path), "-o", str(out), "--min-agreement", "0.5"])
    assert merged.exit_code == 1 and not out.exists()
    assert f"below --min-agreement 0.5 for 1 of 3 classes: two 'zero' {100 * agreement[2]:.0f}% (real 100%)" \
        in merged.stderr and "Use a model that covers this data" in merged.stderr
    accepted = CliRunner().invoke(main, ["merge", str(wd.path), "-o", str(out)])
    assert accepted.exit_code == 0 and d3mfmt.load_file(out).manifest.build["agreement"]["two"]["regenerated"] < 0.5


def test_the_imagenet_script_uses_only_options_d3m_build_has():
    import re

    from builder.cli import build_command, merge_command

    script = (ROOT / "examples" / "build_imagenet_sd15.sh").read_text()
    known = {opt for command in (build_command, merge_command) for p in command.params for opt in p.opts}
    body = script.split("set -euo pipefail", 1)[1]
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", "\n".join(
        line.split("#")[0] for line in body.splitlines() if "torchrun" not in line and "accelerate" not in line)))
    assert used and used <= known, used - known
    assert "-m builder.cli" in script and "--shard auto" in script
