"""What pinning a model costs: the retired whole-folder hash against the file pin (SPEC "Model identity").

Usage:
    python examples/bench_model_identity.py [--gib 1]

Builds, in a temporary folder, the built-in model's files with its UNet weights
replaced by a sparse file of ``--gib`` GiB (no disk is used), once as a plain
folder and once as a Hugging Face cache snapshot (blob + symlink), and times:

- ``legacy``: the d3mfmt 0.1 rule, sha256 over every weight/config file's bytes;
- ``pin, hub cache``: digests taken from the blob names (nothing large is read);
- ``pin, folder, first``: every large file hashed once;
- ``pin, folder, again``: a new process's view (in-process memo cleared): the
  digest table under the d3mfmt cache answers.

Prints one table; medians of ``--repeat`` runs. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d3mfmt import modelpin  # noqa: E402
from d3mfmt.modelpin import model_identity  # noqa: E402
from d3mfmt.models import resolve_model  # noqa: E402

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def legacy_identity(root: Path) -> str:
    """The retired rule, for comparison only: every .json/.txt/.safetensors/.model/.bin file, bytes and all."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.suffix in (".json", ".txt", ".safetensors", ".model", ".bin"))
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def make_folders(tmp: Path, gib: float) -> tuple[Path, Path]:
    """(plain folder, hub snapshot) of the built-in model with a sparse ``gib``-GiB UNet file."""
    folder = shutil.copytree(resolve_model("d3m/tiny-mnist"), tmp / "folder")
    with open(folder / WEIGHTS, "wb") as f:
        f.truncate(int(gib * (1 << 30)))
    repo = tmp / "hub" / "models--org--big"
    snapshot = repo / "snapshots" / ("0" * 40)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        blob = repo / "blobs" / (("ab" * 32) if rel.as_posix() == WEIGHTS else hashlib.sha256(path.read_bytes()).hexdigest())
        blob.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, blob) if rel.as_posix() == WEIGHTS else shutil.copyfile(path, blob)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snapshot / rel).parent), snapshot / rel)
    return folder, snapshot


def timed(fn, repeat: int, before=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["D3MFMT_CACHE_DIR"] = str(Path(tmp) / "d3mfmt-cache")
        folder, snapshot = make_folders(Path(tmp), args.gib)
        digest_table = Path(tmp) / "d3mfmt-cache" / modelpin.DIGEST_CACHE_FILE

        def cold():
            modelpin._DIGEST_MEMO.clear()
            digest_table.unlink(missing_ok=True)

        rows = [
            ("legacy (whole folder, d3mfmt 0.1)", timed(lambda: legacy_identity(folder), args.repeat)),
            ("pin, hub cache (blob names)", timed(lambda: model_identity(snapshot), args.repeat, cold)),
            ("pin, folder, first (hashes once)", timed(lambda: model_identity(folder), args.repeat, cold)),
            ("pin, folder, again (digest table)", timed(lambda: model_identity(folder), args.repeat,
                                                        modelpin._DIGEST_MEMO.clear)),
        ]
    base = rows[0][1]
    print(f"model identity with a {args.gib:g} GiB weight file (median of {args.repeat})")
    print(f"{'rule':38s} {'seconds':>9s} {'vs legacy':>10s}")
    for name, seconds in rows:
        print(f"{name:38s} {seconds:9.4f} {base / seconds:9.0f}x")


if __name__ == "__main__":
    main()
