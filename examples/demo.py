"""The built-in demo (what `make demo` runs): distil MNIST, look at it, train on it.

Usage:
    python examples/demo.py [--out out] [--student-steps 500]

1. ``d3m-build --demo -o OUT/mnist_ipc10.d3m``: the built-in tiny diffusion
   model, teacher and MNIST train split, with the measured defaults;
2. ``d3m-inspect`` it: ``summary``, ``check``, ``verify``, ``preview``;
3. train a ConvNet-3 student from the archive alone and report its accuracy
   on the 1,000 held-out digits (protocol S: stored labels only).

Every step runs the same commands a user would type.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(*cmd: str) -> None:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out")
    ap.add_argument("--student-steps", default="500")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    archive = str(args.out / "mnist_ipc10.d3m")

    # 1. distil
    sh(str(bindir / "d3m-build"), "--demo", "-o", archive)
    # 2. look at it
    inspect = str(bindir / "d3m-inspect")
    sh(inspect, archive)
    sh(inspect, "check", archive)
    sh(inspect, "verify", archive, "--images", "10")
    sh(inspect, "preview", archive, "-o", str(args.out / "mnist_ipc10_preview.png"))
    # 3. train on it
    sh(sys.executable, str(ROOT / "examples" / "train_student.py"), archive, "--steps", args.student_steps)


if __name__ == "__main__":
    main()
