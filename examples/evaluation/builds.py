"""The benchmark's archives: one d3m-build per setting, cached in a folder named by the resolved settings.

``OUT/builds/<name>-<hash>/`` holds the work directory, ``archive.d3m`` (the
default top-5 labels) and ``archive.hard.d3m`` (the same build written with
one-hot labels: what a user of the label-free protocols needs to store). The
hash covers every setting the build uses after the model's defaults are filled
in, so a changed default builds anew and a rerun reuses what exists. After the
build the consumer's pixel cache is filled (``D3MDataset.materialize``), the
first epoch a user pays once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import builder_adapter as builder

log = logging.getLogger("benchmark")


@dataclass(frozen=True)
class ArchiveSpec:
    method: str  # "d3m", "word" (class word, --ti-steps 0), "d3m-grid1", ... (a label in the results)
    ipc: int
    grid: int = 2
    resolution: int | None = None  # None: the built-in model's default for the grid
    ti_steps: int | None = None  # None: the model's default; 0: the class word
    ti_batch: int | None = None
    trust_render_cost: bool = False  # over a default reader's render bounds: built and read with them lifted

    def render(self):
        """How the benchmark renders this archive (``D3MDataset(render=...)``)."""
        from d3mfmt import RenderOptions
        from d3mfmt.renderable import UNBOUNDED

        return RenderOptions(limits=UNBOUNDED if self.trust_render_cost else None)

    def settings(self):
        return builder.demo_build_settings(self.ipc, self.grid, self.resolution, self.ti_steps, self.ti_batch)

    def folder(self, root: Path) -> Path:
        digest = hashlib.sha256(builder.settings_record(self.settings()).encode()).hexdigest()[:10]
        return root / "builds" / f"{self.method}-ipc{self.ipc}-grid{self.grid}-{digest}"


def build_one(spec: ArchiveSpec, root: Path, cache_dir: Path) -> dict:
    """Build (or reuse) ``spec``'s archive, its one-hot twin and its pixel cache; returns their paths and sizes."""
    from d3mfmt import D3MDataset

    folder = spec.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    soft, hard = folder / "archive.d3m", folder / "archive.hard.d3m"
    start = time.perf_counter()
    if not soft.is_file():
        builder.build_demo_archive(spec.settings(), soft, folder / "work", spec.render().limits)
    if not hard.is_file():
        builder.write_label_variant(folder / "work", hard, "hard")
    built = time.perf_counter()
    D3MDataset(soft, cache_dir=cache_dir, render=spec.render()).materialize(progress=False)
    log.info("%s: build %.0fs, consumer render %.0fs", folder.name, built - start, time.perf_counter() - built)
    return {"path": str(soft), "bytes_soft": soft.stat().st_size, "bytes_hard": hard.stat().st_size}


def existing(spec: ArchiveSpec, root: Path) -> dict | None:
    """``build_one``'s result for a finished build, without building (None when it is not there)."""
    folder = spec.folder(root)
    soft, hard = folder / "archive.d3m", folder / "archive.hard.d3m"
    if not (soft.is_file() and hard.is_file()):
        return None
    return {"path": str(soft), "bytes_soft": soft.stat().st_size, "bytes_hard": hard.stat().st_size}
