"""Hostile input at the consumer and builder edges (issue 10, part B): the pixel cache, printed names,
devices, teachers, work directories, export folders and the output folder."""

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from d3mfmt import D3MDataset, D3MError


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder nobody here can create files in: chmod 555 for a normal user; /sys for root."""
    if os.geteuid() != 0:
        folder = tmp_path / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys")
    if not folder.is_dir() or os.access(folder, os.W_OK) and _can_create(folder):
        pytest.skip("no folder here refuses writes to root")
    yield folder


def _can_create(folder: Path) -> bool:
    try:
        (folder / ".d3m-probe").touch()
    except OSError:
        return False
    (folder / ".d3m-probe").unlink()
    return True


# -- the pixel cache --------------------------------------------------------


@pytest.fixture
def ds(tiny_archive_path, tmp_path):
    return D3MDataset(tiny_archive_path, cache_dir=tmp_path / "cache", device="cpu")


def _fresh(ds):
    return D3MDataset(ds.path, cache_dir=ds.cache_root, device="cpu")


def test_same_size_corruption_and_zeroed_pixels_are_rendered_again(ds):
    x = ds.images([0])[0]
    path = ds._cache_path(0)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # one pixel off by one level: same size, same header
    zeroed = good[: len(good) - 3 * 32 * 32 - 32] + bytes(3 * 32 * 32) + good[-32:]
    plain = io.BytesIO()
    np.save(plain, np.zeros((3, 32, 32), np.uint8))  # a well-formed .npy of the right shape, all zeros
    for bad in (bytes(flipped), zeroed, plain.getvalue(), bytes(len(good))):
        path.write_bytes(bad)
        fresh = _fresh(ds)
        assert fresh._read_cached(0) is None
        assert torch.equal(fresh.images([0])[0], x)
        assert path.read_bytes() == good  # the bad entry was replaced by a good one


def test_a_huge_declared_shape_is_never_allocated(ds):
    ds.images([1])
    path = ds._cache_path(1)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (3, 200000, 200000)})
    path.write_bytes(buf.getvalue() + bytes(64))
    fresh = _fresh(ds)
    assert fresh._read_cached(1) is None
    assert fresh.images([1])[1].shape == (3, 32, 32)


def test_a_fifo_in_the_cache_does_not_hang(ds):
    path = ds._cache_path(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    assert ds._read_cached(2) is None
    assert ds.images([2])[2].shape == (3, 32, 32)  # rendered; the write replaces the FIFO
    assert path.is_file()


@pytest.mark.parametrize("where", ["unwritable folder", "a file"])
def test_an_unwritable_cache_keeps_images_in_memory_with_one_warning(tiny_archive_path, tmp_path, unwritable_dir,
                                                                     where):
    cache = unwritable_dir / "d3m-cache" if where == "unwritable folder" else tmp_path / "file"
    if where == "a file":
        cache.write_bytes(b"not a folder")
    reference = D3MDataset(tiny_archive_path, cache_dir=tmp_path / "ok", device="cpu")
    ds = D3MDataset(tiny_archive_path, cache_dir=cache, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[k] for k in (0, 20, 40)]  # three images of three classes: three failed writes
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "cannot be written" in messages[0] and "cache_dir" in messages[0], messages
    for k, (x, _, _) in zip((0, 20, 40), items):
        assert torch.equal(x, reference[k][0])


def test_the_cache_key_follows_the_transformers_version(ds, monkeypatch):
    import transformers

    before = ds.cache_dir
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert _fresh(ds).cache_dir != before
