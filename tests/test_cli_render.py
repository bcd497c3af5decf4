"""d3m-inspect's rendering subcommands: verify, preview, export images|embeddings, card.

They run in this process (CliRunner), so the tiny model loads once; preview,
export and card read a pixel cache the session rendered once (``tiny_cache``).
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import CPU, copy_cache, run_inspect
from PIL import Image

import d3mfmt

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_cache(tiny_archive_path, tmp_path_factory):
    """A pixel-cache root holding all 12 images of the tiny archive."""
    from d3mfmt import D3MDataset

    root = tmp_path_factory.mktemp("tiny-cache")
    D3MDataset(tiny_archive_path, cache_dir=root, render=CPU).materialize(progress=False)
    return root


@pytest.fixture
def cache(tiny_cache, tmp_path):
    """A private copy of ``tiny_cache`` (a run may add files to it)."""
    copy_cache(tiny_cache, tmp_path / "cache")
    return tmp_path / "cache"


def cache_files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def test_verify_passes_untouched_and_fails_on_a_tampered_fingerprint(tiny_archive_path, tmp_path):
    ok = run_inspect("verify", tiny_archive_path, "--images", "3", "--device", "cpu")
    assert ok.exit_code == 0, ok.output
    assert "verify OK: 3 images, max drift 0" in ok.stdout and ok.stdout.count(" drift 0\n") == 3
    a = d3mfmt.load_file(tiny_archive_path)
    prints = a.fingerprints.copy()
    prints[0, 0, 1, 1] = (int(prints[0, 0, 1, 1]) + 40) % 256  # image (0, 0) is always sampled
    bad = tmp_path / "tampered.d3m"
    d3mfmt.save_file(replace(a, fingerprints=prints), bad)
    out = run_inspect("verify", bad, "--images", "3", "--tolerance", "39")
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.exception
    assert "class 0 (class 0) image 0: drift 40" in out.stdout and "verify FAILED" in out.stdout
    assert "(tolerance 39 of 255)" in out.stdout
    assert run_inspect("verify", bad, "--images", "3", "--tolerance", "40").exit_code == 0


def test_verify_without_fingerprints_is_a_clear_error_before_any_model_loads(monkeypatch):
    from d3mfmt import generator

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generator, "shared_pipeline", no_loading)
    golden = ROOT / "spec" / "vectors" / "multivector.d3m"
    for extra in ([], ["--images", "0"], ["--tolerance", "300"]):
        out = run_inspect("verify", golden, *extra)
        assert out.exit_code == 1 and "has no fingerprints" in out.stderr, out.output
        assert isinstance(out.exception, SystemExit)


def test_preview_writes_a_row_per_class(tiny_archive_path, cache, tmp_path):
    before = cache_files(cache)
    png = tmp_path / "grid.png"
    out = run_inspect("preview", tiny_archive_path, "-o", png, "--per-class", "3", "--select", "0,c2",
                      "--cache-dir", cache)
    assert out.exit_code == 0, out.output
    assert out.stdout == f"wrote {png}\n"
    with Image.open(png) as img:
        assert img.size == (110 + 3 * 132, 2 * 132)
    assert cache_files(cache) == before  # the cached images were read, nothing rendered again
    bad = run_inspect("preview", tiny_archive_path, "-o", png, "--select", "zebra", "--cache-dir", cache)
    assert bad.exit_code == 1 and "'zebra' is not a class" in bad.stderr


def test_export_images_imagefolder_layout(tiny_archive_path, cache, tmp_path):
    before = cache_files(cache)
    out = run_inspect("export", "images", tiny_archive_path, "-o", tmp_path / "imgs", "--cache-dir", cache)
    assert out.exit_code == 0, out.output
    assert out.stdout == f"wrote 48 PNGs to {tmp_path / 'imgs'}\n"
    folders = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert folders == ["0000_class_0", "0001_class_1", "0002_class_2"]
    files = sorted((tmp_path / "imgs" / "0001_class_1").iterdir())
    assert len(files) == 16 and files[0].name == "c0001_i0000_p0.png"
    with Image.open(files[0]) as patch:
        assert patch.size == (16, 16)
    assert cache_files(cache) == before
    whole = run_inspect("export", "images", tiny_archive_path, "-o", tmp_path / "whole", "--unit", "image",
                        "--cache-dir", cache)
    assert whole.exit_code == 0, whole.output
    collages = sorted((tmp_path / "whole" / "0002_class_2").iterdir())
    assert [p.name for p in collages] == [f"c0002_i{i:04d}.png" for i in range(4)]
    with Image.open(collages[0]) as collage:
        assert collage.size == (32, 32)
    again = run_inspect("export", "images", tiny_archive_path, "-o", tmp_path / "imgs", "--cache-dir", cache)
    assert again.exit_code == 1 and "not an empty folder" in again.stderr


def test_export_embeddings_files(tiny_archive_path, tmp_path):
    import safetensors

    out = run_inspect("export", "embeddings", tiny_archive_path, "-o", tmp_path / "emb")
    assert out.exit_code == 0, out.output
    files = sorted((tmp_path / "emb").iterdir())
    assert [f.name for f in files] == ["0000_class_0.safetensors", "0001_class_1.safetensors", "0002_class_2.safetensors"]
    with safetensors.safe_open(files[2], "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == ["<d3m-c2>"]
        np.testing.assert_array_equal(f.get_tensor("<d3m-c2>"), d3mfmt.load_file(tiny_archive_path).embeddings[2])


def test_card_subcommand_writes_a_folder_with_the_render_options(tiny_archive_path, cache, tmp_path):
    from huggingface_hub import DatasetCard

    before = cache_files(cache)
    out = run_inspect("card", tiny_archive_path, "-o", tmp_path / "new" / "card", "--repo-id", "me/tiny",
                      "--per-class", "2", "--cache-dir", cache, "--device", "cpu")
    assert out.exit_code == 0, out.output
    card = tmp_path / "new" / "card"
    assert sorted(p.name for p in card.iterdir()) == ["README.md", "preview.png", "tiny.d3m"]
    with Image.open(card / "preview.png") as preview:
        assert preview.size == (110 + 2 * 132, 3 * 132)  # 3 classes, --per-class 2
    assert "hf://datasets/me/tiny/tiny.d3m" in DatasetCard.load(card / "README.md").text
    assert cache_files(cache) == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    refused = run_inspect("card", tiny_archive_path, "-o", tmp_path / "full", "--cache-dir", cache)
    assert refused.exit_code == 1 and "not an empty folder" in refused.stderr
    assert isinstance(refused.exception, SystemExit)
