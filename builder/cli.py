"""``d3m-build``: turns real images into a .d3m archive (arrives with the builder issue)."""

import sys


def main() -> None:
    print("d3m-build: the builder is not implemented yet (issue 5); nothing was written.", file=sys.stderr)
    sys.exit(2)
