"""Run every .d3m in a folder through the reader and the renderer, each step under a time and memory limit.

Usage:
    python examples/hostile_corpus.py DIR [--timeout 60] [--memory-mib 1024] [--verify-images 4] [--json OUT.json]
    python tests/hostile_archives.py /tmp/corpus && python examples/hostile_corpus.py /tmp/corpus

For each archive, every step runs in its own subprocess, killed once its resident
memory (``VmHWM``, polled every 50 ms) passes ``--memory-mib`` or its time
``--timeout`` seconds (``RLIMIT_DATA`` at four times the memory limit stops one
huge allocation between two polls):

    check    d3mfmt.summary.check(bytes): "valid" or the first problem
    summary  d3mfmt.load_file + summarize + render_text (what ``d3m-inspect FILE`` prints)
    json     the summary as strict JSON (no NaN/Infinity), what ``--json`` must print
    render   D3MDataset(path)[0] on the CPU, finite pixels        (only when the check says valid)
    verify   d3mfmt.verify.verify with --verify-images images     (only when valid and fingerprinted)

Outcomes: ok / valid, refused (a D3MError with its message: the clean answer
to a hostile archive), FAIL (any other exception: a traceback), TIMEOUT,
MEMORY (MemoryError or killed at the limit), NOT-JSON, DRIFT. A folder may hold
``expected.json`` (name -> {"expect": "valid" | "refused"}); the check must agree.
The table goes to stdout; the exit status is 1 when any row is bad. It calls
the library, not the CLI, so it does not depend on ``d3m-inspect``'s flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

STEPS = ("check", "summary", "json", "render", "verify")
BAD = ("FAIL", "TIMEOUT", "MEMORY", "NOT-JSON", "DRIFT", "CRASH")


# -- inside the limited child process ---------------------------------------------------------------------


def _summary(path: str) -> dict:
    import d3mfmt
    from d3mfmt import container
    from d3mfmt.summary import summarize

    data = container.read_bytes(path)
    members = {name: len(body) for name, body in container.read_zip(data).items()}
    return summarize(d3mfmt.load(data), members, len(data))


def step_check(path: str, _args) -> tuple[str, str]:
    from d3mfmt import container
    from d3mfmt.summary import check

    problems = check(container.read_bytes(path))
    return ("refused", problems[0]) if problems else ("valid", "")


def step_summary(path: str, _args) -> tuple[str, str]:
    from d3mfmt.summary import render_text

    text = render_text(_summary(path))
    return "ok", f"{len(text.splitlines())} lines"


def step_json(path: str, _args) -> tuple[str, str]:
    summary = _summary(path)
    try:
        text = json.dumps(summary, allow_nan=False)
    except ValueError as exc:  # NaN or Infinity somewhere in the summary
        return "NOT-JSON", f"{exc}: {json.dumps(summary)[:300]}"
    return "ok", f"{len(text)} bytes"


def step_render(path: str, _args) -> tuple[str, str]:
    import torch

    from d3mfmt import D3MDataset, RenderOptions

    with tempfile.TemporaryDirectory() as cache:
        x, label, c = D3MDataset(path, cache_dir=cache, render=RenderOptions(device="cpu"))[0]
    if not bool(torch.isfinite(x).all()):
        return "FAIL", "non-finite pixels"
    return "ok", f"{tuple(x.shape)} class {c}"


def step_verify(path: str, args) -> tuple[str, str]:
    import d3mfmt
    from d3mfmt.verify import verify

    archive = d3mfmt.load_file(path)
    if archive.fingerprints is None:
        return "ok", "no fingerprints"
    report = verify(archive, d3mfmt.RenderOptions(device="cpu"), n=args.verify_images)
    worst = int(report.drift.max(initial=0))
    return ("ok" if report.ok else "DRIFT"), f"{len(report.images)} images, max drift {worst}"


def run_child(step: str, path: str, args) -> None:
    """One step, its outcome printed as one JSON line (the parent reads the last line)."""
    from d3mfmt import D3MError

    start = time.perf_counter()
    try:
        outcome, detail = globals()[f"step_{step}"](path, args)
    except D3MError as exc:
        outcome, detail = "refused", str(exc)
    except MemoryError:
        outcome, detail = "MEMORY", "MemoryError"
    except BaseException as exc:  # noqa: BLE001 - a traceback is exactly what this runner reports
        outcome = "FAIL"
        detail = f"{type(exc).__name__}: {exc}"[:300] + " | " + traceback.format_exc().strip().splitlines()[-3][:200]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"outcome": outcome, "detail": detail[:600], "seconds": round(time.perf_counter() - start, 2),
                      "peak_mib": round(peak)}), flush=True)


# -- the parent: one limited subprocess per step ------------------------------------------------------------


def _limit(memory_mib: int):
    def apply():
        # a backstop against one huge allocation between two polls of the watchdog below; RLIMIT_DATA counts
        # virtual memory (malloc arenas, oneDNN scratch), so it sits well above the resident limit judged
        backstop = 4 * memory_mib << 20
        resource.setrlimit(resource.RLIMIT_DATA, (backstop, backstop))
        os.setsid()  # its own process group, so a timeout kills every thread and child

    return apply


def _peak_rss_mib(pid: int) -> int | None:
    """The process's resident high-water mark (VmHWM), MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def run_step(step: str, path: Path, args) -> dict:
    """One step in a subprocess killed past ``--timeout`` seconds or ``--memory-mib`` resident MiB."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", step, str(path),
           "--verify-images", str(args.verify_images)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    start, peak, killed = time.perf_counter(), 0, None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, preexec_fn=_limit(args.memory_mib))
        while proc.poll() is None:
            peak = max(peak, _peak_rss_mib(proc.pid) or 0)
            if peak > args.memory_mib:
                killed = ("MEMORY", f"resident {peak} MiB, over {args.memory_mib}")
            elif time.perf_counter() - start > args.timeout:
                killed = ("TIMEOUT", f"over {args.timeout:g} s")
            if killed:
                os.killpg(proc.pid, 9)
                proc.wait()
                break
            time.sleep(0.05)
        seconds = round(time.perf_counter() - start, 2)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        tail = (err.read().strip().splitlines() or [""])[-1][:300]
    if killed:
        return {"outcome": killed[0], "detail": killed[1], "seconds": seconds, "peak_mib": peak or None}
    if not lines:
        what = "MEMORY" if "MemoryError" in tail or "bad_alloc" in tail else "CRASH"
        return {"outcome": what, "detail": f"exit {proc.returncode}: {tail}", "seconds": seconds, "peak_mib": peak or None}
    result = json.loads(lines[-1])
    if result["peak_mib"] > args.memory_mib:  # grew past the limit between two polls
        result.update(outcome="MEMORY", detail=f"resident {result['peak_mib']} MiB, over {args.memory_mib}")
    return result


def run_archive(path: Path, args, expected: dict) -> dict:
    row = {"archive": path.stem, "expect": expected.get(path.stem, {}).get("expect"), "steps": {}}
    for step in STEPS:
        if step in ("render", "verify") and row["steps"]["check"]["outcome"] != "valid":
            continue
        row["steps"][step] = run_step(step, path, args)
    row["problems"] = judge(row)
    return row


def judge(row: dict) -> list[str]:
    """What is wrong with one archive's run: a traceback, a limit, a check that disagrees with the expectation."""
    problems = [f"{s}: {r['outcome']} ({r['detail'][:120]})" for s, r in row["steps"].items() if r["outcome"] in BAD]
    check = row["steps"]["check"]["outcome"]
    if row["expect"] and check != row["expect"]:
        problems.append(f"check says {check}, expected {row['expect']}")
    if check == "valid":
        for step in ("summary", "json", "render", "verify"):
            if step in row["steps"] and row["steps"][step]["outcome"] != "ok":
                problems.append(f"check says valid but {step} is {row['steps'][step]['outcome']}")
    return problems


def print_table(rows: list[dict]) -> None:
    width = max([len(r["archive"]) for r in rows] + [7])
    head = f"{'archive':<{width}}  {'expect':<7}  " + "  ".join(f"{s:<8}" for s in STEPS) + "  max s  peak MiB  verdict"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = [r["steps"][s]["outcome"] if s in r["steps"] else "-" for s in STEPS]
        secs = max(x["seconds"] for x in r["steps"].values())
        peaks = [x["peak_mib"] for x in r["steps"].values() if x["peak_mib"] is not None]
        verdict = "ok" if not r["problems"] else "BAD: " + "; ".join(r["problems"])
        print(f"{r['archive']:<{width}}  {r['expect'] or '?':<7}  " + "  ".join(f"{c:<8}" for c in cells)
              + f"  {secs:5.1f}  {max(peaks) if peaks else '?':>8}  {verdict}")
    bad = sum(bool(r["problems"]) for r in rows)
    slowest = max(max(x["seconds"] for x in r["steps"].values()) for r in rows) if rows else math.nan
    peak = max((x["peak_mib"] or 0 for r in rows for x in r["steps"].values()), default=0)
    print(f"\n{len(rows)} archives, {bad} bad; slowest step {slowest:.1f} s, highest peak {peak} MiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per step (default 60)")
    parser.add_argument("--memory-mib", type=int, default=1024, help="resident memory per step, MiB (default 1024)")
    parser.add_argument("--verify-images", type=int, default=4, help="images verify renders (default 4)")
    parser.add_argument("--json", type=Path, help="also write every outcome to this file")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child[0], args.child[1], args)
        return 0
    paths = sorted(args.folder.glob("*.d3m")) if args.folder is not None else []
    if not paths:
        parser.error(f"{args.folder} holds no .d3m files")
    expected_file = args.folder / "expected.json"
    expected = json.loads(expected_file.read_text()) if expected_file.is_file() else {}
    rows = []
    for path in paths:
        rows.append(run_archive(path, args, expected))
        print(f"  {path.name}: {'ok' if not rows[-1]['problems'] else 'BAD'}", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
