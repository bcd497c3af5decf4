"""The built-in demo (what `make demo` runs).

Usage:
    python examples/demo.py [--out out]

Until the builder lands this writes the ImageNet-1k-shaped archive of
examples/size_report.py to OUT/imagenet_shaped.d3m, then summarises and checks
it and the golden archives in spec/vectors/ with d3m-inspect.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import d3mfmt
from size_report import synthetic_imagenet_archive  # examples/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. write an archive through the library
    path = args.out / "imagenet_shaped.d3m"
    d3mfmt.save_file(synthetic_imagenet_archive(), path)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)", file=sys.stderr)

    # 2. summarise and check it, and the golden vectors, as a user would
    inspect = [sys.executable, "-c", "from d3mfmt.cli import inspect_main; inspect_main()"]
    subprocess.run([*inspect, str(path)], check=True)
    for archive in [path, *sorted((ROOT / "spec" / "vectors").glob("*.d3m"))]:
        subprocess.run([*inspect, "--check", str(archive)], check=True)


if __name__ == "__main__":
    main()
