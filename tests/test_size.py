"""The size budget: an ImageNet-1k IPC-10 archive with the default encoding fits in 2.5 MB."""

import importlib.util
from pathlib import Path

import d3mfmt
from d3mfmt.container import read_zip

ROOT = Path(__file__).resolve().parent.parent


def _size_report():
    spec = importlib.util.spec_from_file_location("size_report", ROOT / "examples" / "size_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imagenet_shaped_archive_fits_the_budget():
    archive = _size_report().synthetic_imagenet_archive()
    assert archive.manifest.labels == d3mfmt.LabelEncoding()  # the default encoding
    data = d3mfmt.save(archive)
    sizes = {name: len(b) for name, b in read_zip(data).items()}
    assert len(data) <= 2_500_000, sizes
    # embeddings are 1000 x 768 fp16 = 1,536,000 bytes: labels must stay well below them
    assert sizes["labels.zst"] < 600_000, sizes
    assert d3mfmt.load(data).labels.rows == 40_000
