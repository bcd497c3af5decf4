"""The evaluation's one door into ``builder/``: every builder name it uses is imported here and only here.

If the builder's modules move, re-pointing the imports below is all the
evaluation needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.assemble import merge_archives
from builder.labeloptions import label_encoding
from builder.inversion import InversionSettings
from builder.labelling import teacher_probs
from builder.patches import PatchSettings, make_collages, select_patches
from builder.pipeline import build_archive
from builder.settings import DEMO_MODEL, RunOptions, demo_settings, resolve_settings
from builder.sources import ImageFolderSource, MnistSource
from builder.teachers import TEACHERS, load_teacher, resolve_teacher

__all__ = [
    "BUILTIN_TEACHERS", "ImageFolderSource", "MnistSource", "PatchSettings", "build_demo_archive",
    "demo_build_settings", "load_teacher", "make_collages", "mnist_source_info", "resolve_teacher",
    "DEMO_MODEL", "select_patches", "settings_record", "teacher_probs", "teacher_weights_bytes",
    "write_label_variant",
]

BUILTIN_TEACHERS = tuple(TEACHERS)


def demo_build_settings(ipc: int, grid: int = 2, resolution: int | None = None, ti_steps: int | None = None,
                        ti_batch: int | None = None):
    """The demo build (built-in model and teacher, the model's defaults) at this IPC and grid."""
    return demo_settings(ipc=ipc, grid=grid, resolution=resolution,
                         inversion=InversionSettings(steps=ti_steps, batch=ti_batch))


def settings_record(settings) -> str:
    """The settings a build will actually use (model defaults filled in), as canonical JSON.

    The built-in model has a measured default resolution for every grid, so the
    native-resolution argument is never consulted for it.
    """
    from d3mfmt.models import BUILTIN_MODELS

    resolved = resolve_settings(settings, BUILTIN_MODELS[DEMO_MODEL].resolution)
    return json.dumps(resolved.to_json(), sort_keys=True)


def build_demo_archive(settings, out: Path, workdir: Path, render_limits=None) -> Path:
    """Build the MNIST train split into ``out`` (checkpoints in ``workdir``; an interrupted build resumes;
    ``render_limits``: ``RunOptions.render_limits``)."""
    build_archive(MnistSource("train"), settings, Path(out), labels=label_encoding(), workdir=Path(workdir),
                  run=RunOptions(device="cpu", progress=False, render_limits=render_limits))
    return Path(out)


def mnist_source_info(split: str = "train"):
    """The ``SourceInfo`` a build of the built-in MNIST ``split`` records in its manifest."""
    return MnistSource(split).info()


def write_label_variant(workdir: Path, out: Path, kind: str) -> Path:
    """Write the archive of a finished build again with another label encoding (no rendering)."""
    merge_archives([Path(workdir)], Path(out), labels=label_encoding(kind))
    return Path(out)


def teacher_weights_bytes(name: str) -> int:
    """Size of a built-in teacher's weight file."""
    return TEACHERS[name].weights.stat().st_size
