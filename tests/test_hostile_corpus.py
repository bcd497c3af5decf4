"""examples/hostile_corpus.py: each step in a limited subprocess, outcomes judged against expected.json."""

import json
import subprocess
import sys
from pathlib import Path

from hostile_archives import HUGE_INT, VECTORS, raw_manifest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import hostile_corpus  # noqa: E402


def test_the_runner_judges_refusals_renders_and_expectations(tmp_path):
    good = (VECTORS / "onehot.d3m").read_bytes()
    (tmp_path / "ok_onehot.d3m").write_bytes(good)
    (tmp_path / "huge_guidance.d3m").write_bytes(
        raw_manifest(good, b'"guidance_scale":2.0', b'"guidance_scale":' + HUGE_INT.encode()))
    (tmp_path / "expected.json").write_text(json.dumps({"ok_onehot": {"expect": "valid"},
                                                        "huge_guidance": {"expect": "refused"}}))
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hostile_corpus.py"), str(tmp_path),
                           "--timeout", "300", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["archive"]: r for r in json.loads(out.read_text())}
    refused = rows["huge_guidance"]["steps"]
    assert [refused[s]["outcome"] for s in ("check", "summary", "json")] == ["refused"] * 3
    assert "render" not in refused and "integer of 4300 digits" in refused["check"]["detail"]
    ok = rows["ok_onehot"]["steps"]
    assert [ok[s]["outcome"] for s in hostile_corpus.STEPS] == ["valid", "ok", "ok", "ok", "ok"]
    assert "2 archives, 0 bad" in proc.stdout


def test_the_verdict_names_tracebacks_limits_and_disagreements():
    def row(expect, **outcomes):
        return {"expect": expect, "steps": {s: {"outcome": o, "detail": "x"} for s, o in outcomes.items()}}

    assert hostile_corpus.judge(row("refused", check="refused", summary="refused", json="refused")) == []
    assert hostile_corpus.judge(row("refused", check="valid", summary="ok", json="ok", render="ok", verify="ok")) == [
        "check says valid, expected refused"]
    problems = hostile_corpus.judge(row("valid", check="valid", summary="FAIL", json="NOT-JSON", render="TIMEOUT",
                                        verify="DRIFT"))
    assert len(problems) == 8 and any("summary: FAIL" in p for p in problems)
    assert hostile_corpus.judge(row(None, check="valid", summary="ok", json="ok", render="refused", verify="ok")) == [
        "check says valid but render is refused"]
