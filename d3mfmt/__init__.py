"""d3mfmt: the .d3m distilled-dataset format (D3M, arXiv 2403.07142).

The core (this namespace) reads, validates and writes archives with numpy,
safetensors and zstandard only; torch and diffusers are imported lazily by the
modules that make pixels.

Example:
    >>> import d3mfmt
    >>> archive = d3mfmt.load_file("spec/vectors/topk.d3m")   # doctest: +SKIP
    >>> archive.labels.dense().sum(axis=1)                    # doctest: +SKIP
"""

from .archive import Archive, content_hash, load, load_file, save, save_file
from .downloads import DownloadLimits
from .errors import D3MError, D3MFormatError, D3MModelError
from .labels import LabelEncoding, LabelTable, encode as encode_labels
from .renderable import RenderLimits
from .manifest import (
    ClassInfo,
    DatasetInfo,
    EmbeddingInfo,
    GeneratorInfo,
    Manifest,
    ModelRef,
    SourceInfo,
    TeacherInfo,
)
from .render import RenderOptions
from .sources import resolve_archive

__version__ = "0.1.0"

_LAZY = {"D3MDataset": "dataset", "D3MDistributedSampler": "distributed", "Regenerator": "generator"}  # torch-backed: imported on first use

__all__ = [
    "Archive",
    "ClassInfo",
    "D3MDataset",
    "D3MDistributedSampler",
    "D3MError",
    "D3MFormatError",
    "D3MModelError",
    "DatasetInfo",
    "DownloadLimits",
    "EmbeddingInfo",
    "GeneratorInfo",
    "LabelEncoding",
    "LabelTable",
    "Manifest",
    "ModelRef",
    "Regenerator",
    "RenderLimits",
    "RenderOptions",
    "SourceInfo",
    "TeacherInfo",
    "content_hash",
    "encode_labels",
    "load",
    "load_file",
    "resolve_archive",
    "save",
    "save_file",
]


def __getattr__(name: str):
    # torch-backed pieces load on first use, so reading archives stays torch-free
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'd3mfmt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
