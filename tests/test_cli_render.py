"""d3m-inspect's rendering modes: --verify, --preview, --export-images, --export-embeddings."""

import subprocess
import sys

import numpy as np
from PIL import Image

import d3mfmt


def inspect(*args, cwd=None):
    cmd = [sys.executable, "-c", "from d3mfmt.cli import inspect_main; inspect_main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)


def test_verify_passes_untouched_and_fails_on_a_tampered_fingerprint(tiny_archive_path, tmp_path):
    ok = inspect(tiny_archive_path, "--verify", "--verify-images", "3")
    assert ok.returncode == 0, ok.stderr
    assert "verify OK: 3 images, max drift 0" in ok.stdout
    a = d3mfmt.load_file(tiny_archive_path)
    prints = a.fingerprints.copy()
    prints[0, 0, 1, 1] = (int(prints[0, 0, 1, 1]) + 40) % 256  # image (0, 0) is always sampled
    from dataclasses import replace

    bad = tmp_path / "tampered.d3m"
    d3mfmt.save_file(replace(a, fingerprints=prints), bad)
    out = inspect(bad, "--verify", "--verify-images", "3")
    assert out.returncode == 1
    assert "class 0 (class 0) image 0: drift 40" in out.stdout and "verify FAILED" in out.stdout
    assert "Traceback" not in out.stderr


def test_verify_without_fingerprints_is_a_clear_error():
    from pathlib import Path

    golden = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "multivector.d3m"
    out = inspect(golden, "--verify")
    assert out.returncode == 1 and "has no fingerprints" in out.stderr and "Traceback" not in out.stderr


def test_preview_writes_a_row_per_class(tiny_archive_path, tmp_path):
    png = tmp_path / "grid.png"
    out = inspect(tiny_archive_path, "--preview", png, "--per-class", "3", "--select", "0,c2", "--cache-dir", tmp_path)
    assert out.returncode == 0, out.stderr
    img = Image.open(png)
    assert img.size == (110 + 3 * 132, 2 * 132)
    bad = inspect(tiny_archive_path, "--preview", png, "--select", "zebra")
    assert bad.returncode == 1 and "'zebra' is not a class" in bad.stderr


def test_export_images_imagefolder_layout(tiny_archive_path, tmp_path):
    out = inspect(tiny_archive_path, "--export-images", tmp_path / "imgs", "--cache-dir", tmp_path / "c")
    assert out.returncode == 0, out.stderr
    folders = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert folders == ["0000_class_0", "0001_class_1", "0002_class_2"]
    files = sorted((tmp_path / "imgs" / "0001_class_1").iterdir())
    assert len(files) == 16 and files[0].name == "c0001_i0000_p0.png"
    assert Image.open(files[0]).size == (16, 16)
    again = inspect(tiny_archive_path, "--export-images", tmp_path / "imgs")
    assert again.returncode == 1 and "not an empty folder" in again.stderr


def test_export_embeddings_files(tiny_archive_path, tmp_path):
    import safetensors

    out = inspect(tiny_archive_path, "--export-embeddings", tmp_path / "emb")
    assert out.returncode == 0
    files = sorted((tmp_path / "emb").iterdir())
    assert [f.name for f in files] == ["0000_class_0.safetensors", "0001_class_1.safetensors", "0002_class_2.safetensors"]
    with safetensors.safe_open(files[2], "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == ["<d3m-c2>"]
        np.testing.assert_array_equal(f.get_tensor("<d3m-c2>"), d3mfmt.load_file(tiny_archive_path).embeddings[2])
