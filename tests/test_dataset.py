"""D3MDataset: items, labels, batching, the pixel cache, pickling, workers, samplers."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from conftest import CPU

import d3mfmt
from d3mfmt import D3MDataset, D3MError, RenderOptions


class RenderCounter:
    """Counts images (and calls) the dataset's regenerator renders (wraps the real render_pairs)."""

    def __init__(self, ds):
        self.count, self.calls, regen = 0, [], ds.regenerator
        real = regen.render_pairs

        def render_pairs(pairs):
            self.count += len(pairs)
            self.calls.append(list(pairs))
            return real(pairs)

        regen.render_pairs = render_pairs


@pytest.fixture
def ds(tiny_archive_path, tmp_path):
    return D3MDataset(tiny_archive_path, cache_dir=tmp_path / "cache", render=CPU)


def _fresh(ds):
    """A new dataset on the same archive and cache (nothing in memory, nothing verified)."""
    return D3MDataset(ds.path, cache_dir=ds.cache_dir, render=CPU)


def test_patch_items_shapes_labels_and_order(ds, tiny_archive_path):
    archive = d3mfmt.load_file(tiny_archive_path)
    assert len(ds) == 3 * 4 * 4
    image, label, cls = ds[4 * 4 + 5]  # class 1, image 1, patch 1
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert label.shape == (3,) and label.dtype == torch.float32
    assert abs(float(label.sum()) - 1) < 1e-6
    assert cls == 1
    np.testing.assert_array_equal(label.numpy(), archive.soft_label(1, 1, 1))
    # the patch is the top-right quarter of the regenerated collage
    full = ds.render_images([5])[5]
    assert torch.equal(image, full[:, :16, 16:])


def test_image_unit_returns_collages_with_all_patch_labels(tiny_archive_path, tmp_path):
    ds = D3MDataset(tiny_archive_path, unit="image", cache_dir=tmp_path, render=CPU)
    assert len(ds) == 12
    image, labels, cls = ds[7]
    assert image.shape == (3, 32, 32) and labels.shape == (4, 3) and cls == 1
    np.testing.assert_allclose(labels.sum(1).numpy(), 1.0, atol=1e-6)


def test_getitems_is_one_batch_and_equals_getitem(ds):
    counter = RenderCounter(ds)
    batch = ds.__getitems__([0, 17, 33, 1])
    assert counter.count == 3  # three distinct images of three classes, in one render call
    assert len(counter.calls) == 1 and sorted(c for c, _ in counter.calls[0]) == [0, 1, 2]
    for k, (image, label, cls) in zip([0, 17, 33, 1], batch):
        again = ds[k]
        assert torch.equal(image, again[0]) and torch.equal(label, again[1]) and cls == again[2]
    assert counter.count == 3


def test_dataloader_batches_and_transform(tiny_archive_path, tmp_path):
    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=CPU, transform=lambda x: x * 2)
    images, labels, classes = next(iter(DataLoader(ds, batch_size=8, shuffle=False)))
    assert images.shape == (8, 3, 16, 16) and labels.shape == (8, 3)
    assert classes.tolist() == [0] * 8
    assert images.max() > 1  # the transform ran


def test_second_epoch_reads_the_cache_even_in_a_new_dataset(tiny_archive_path, tmp_path):
    first = D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=CPU)
    counter = RenderCounter(first)
    epoch1 = [first[k][0] for k in range(len(first))]
    assert counter.count == 12  # every image once, despite 4 patches each
    second = D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=CPU)
    counter2 = RenderCounter(second)
    epoch2 = [second[k][0] for k in range(len(second))]
    assert counter2.count == 0
    assert all(torch.equal(a, b) for a, b in zip(epoch1, epoch2))
    assert len(list(first.image_cache_dir.glob("*.npy"))) == 12
    assert first.cache_dir == tmp_path and first.image_cache_dir.parent == tmp_path  # the root as given, keyed below


def test_a_changed_setting_uses_a_different_cache(tiny_archive_path, tmp_path):
    from dataclasses import replace

    ds32 = D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=CPU)
    ds16 = D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=RenderOptions(device="cpu", dtype="bfloat16"))
    assert ds32.image_cache_dir != ds16.image_cache_dir
    a = d3mfmt.load_file(tiny_archive_path)
    more_steps = replace(a, manifest=replace(a.manifest, generator=replace(a.manifest.generator, steps=3)))
    other = tmp_path / "other.d3m"
    d3mfmt.save_file(more_steps, other)
    assert D3MDataset(other, cache_dir=tmp_path, render=CPU).image_cache_dir != ds32.image_cache_dir


def test_corrupt_cache_file_is_rendered_again(ds):
    x = ds.render_images([0])[0]
    path = ds.pixel_cache.path(0, 0)
    path.write_bytes(b"garbage")
    fresh = D3MDataset(ds.path, cache_dir=ds.cache_dir, render=CPU)
    assert torch.equal(fresh.render_images([0])[0], x)


def test_a_cache_file_is_the_npy_bytes_then_their_keyed_tag(ds):
    import hashlib
    import hmac
    import io
    import stat

    from d3mfmt.pixelcache import KEY_FILE

    x = ds.render_images([6])[6]  # class 1, image 2
    blob = ds.pixel_cache.path(1, 2).read_bytes()
    assert ds.pixel_cache.path(1, 2) == ds.image_cache_dir / "000001_00002.npy"
    key_file = ds.cache_dir / KEY_FILE
    key = key_file.read_bytes()
    assert len(key) == 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    body, tag = blob[:-32], blob[-32:]
    message = f"{ds.image_cache_dir.name}/000001_00002\0".encode() + body
    assert hmac.new(key, message, hashlib.sha256).digest() == tag
    assert hashlib.sha256(body).digest() != tag
    pixels = np.load(io.BytesIO(body), allow_pickle=False)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 32, 32)
    np.testing.assert_array_equal(pixels, torch.round(x * 255).to(torch.uint8).numpy())


def test_pickles_cheaply_without_pipeline_or_arrays(ds):
    ds[0]  # load the model and fill the memory cache
    blob = pickle.dumps(ds)
    assert len(blob) < 4000, len(blob)
    clone = pickle.loads(blob)
    assert clone._regen is None and clone._archive is None
    assert torch.equal(clone[0][0], ds[0][0])


def test_workers_share_the_materialized_cache(tiny_archive_path, tmp_path):
    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=CPU).materialize(progress=False)
    assert len(list(ds.image_cache_dir.glob("*.npy"))) == 12
    loader = DataLoader(ds, batch_size=16, num_workers=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([classes for _, _, classes in loader])
    assert sorted(seen.tolist()) == sorted([k // 16 for k in range(48)])


def test_distributed_sampler_splits_the_dataset(ds):
    parts = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        parts.append(list(sampler))
        batch = next(iter(DataLoader(ds, batch_size=4, sampler=sampler)))
        assert batch[0].shape == (4, 3, 16, 16)
    assert sorted(parts[0] + parts[1]) == list(range(len(ds)))


def test_bad_arguments_and_indices(tiny_archive_path, ds):
    with pytest.raises(D3MError, match="unit must be one of"):
        D3MDataset(tiny_archive_path, unit="pixel")
    with pytest.raises(D3MError, match="render_batch"):
        D3MDataset(tiny_archive_path, render_batch=0)
    for render, message in ((RenderOptions(dtype="float64"), r"RenderOptions.dtype must be one of \['float32'"),
                            (RenderOptions(compile="yes"), "RenderOptions.compile must be True or False"),
                            (RenderOptions(model=""), "RenderOptions.model must be a non-empty string"),
                            ({"device": "cpu"}, "render must be a d3mfmt.RenderOptions, got dict")):
        with pytest.raises(D3MError, match=message):
            D3MDataset(tiny_archive_path, render=render)
    with pytest.raises(TypeError, match="device"):
        D3MDataset(tiny_archive_path, device="cpu")  # the render options travel as one value
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])


def test_cuda_dataset_in_forked_worker_raises_clear_error(tiny_archive_path, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=RenderOptions(device="cuda", dtype="float32"))
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(D3MError, match="forked DataLoader worker"):
        ds[0]


def test_concurrent_cache_writes_of_one_image_do_not_collide(ds):
    from concurrent.futures import ThreadPoolExecutor

    x = ds.render_images([3])[3]
    pixels = torch.round(x * 255).to(torch.uint8)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: ds._write_cached(3, pixels), range(200)))
    assert torch.equal(torch.from_numpy(_fresh(ds).pixel_cache.read(0, 3)), pixels)
    assert not list(ds.image_cache_dir.glob(".*"))  # no temporary files left behind


def test_materialize_fills_render_batches_across_classes_with_identical_pixels(tiny_archive_path, tmp_path):
    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path / "a", render=CPU, render_batch=5)
    counter = RenderCounter(ds)
    ds.materialize(progress=False)
    assert [len(call) for call in counter.calls] == [5, 5, 2]  # 12 images of 3 classes (IPC 4)
    assert {c for c, _ in counter.calls[0]} == {0, 1}  # a batch spans classes
    one = D3MDataset(tiny_archive_path, cache_dir=tmp_path / "b", render=CPU, render_batch=1)
    assert ds.image_cache_dir.name == one.image_cache_dir.name  # render_batch is not in the cache key
    mixed, single = ds.render_images(range(12)), one.render_images(range(12))
    assert all(torch.equal(mixed[k], single[k]) for k in range(12))


def test_materialize_a_subset_of_images(tiny_archive_path, tmp_path):
    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=CPU)
    counter = RenderCounter(ds)
    ds.materialize(progress=False, images=[11, 0, 5, 5])
    assert counter.count == 3 and sorted(p.name for p in ds.image_cache_dir.glob("*.npy")) == [
        "000000_00000.npy", "000001_00001.npy", "000002_00003.npy"]
    with pytest.raises(IndexError, match="image index 12 out of range"):
        ds.materialize(progress=False, images=[12])


def test_the_memory_cache_is_bounded_in_bytes(ds):
    import shutil

    image_bytes = 3 * 32 * 32
    ds.memory_cache_bytes = 2 * image_bytes  # two decoded images
    counter = RenderCounter(ds)
    first = ds.render_images([0, 1, 2])
    assert counter.count == 3
    shutil.rmtree(ds.image_cache_dir)  # from now on only memory can answer without rendering
    assert torch.equal(ds.render_images([2])[2], first[2]) and torch.equal(ds.render_images([1])[1], first[1])
    assert counter.count == 3  # the two most recent images came from memory
    assert torch.equal(ds.render_images([0])[0], first[0]) and counter.count == 4  # evicted: rendered again
    ds.memory_cache_bytes = 0  # nothing kept: a read needs the file
    ds.render_images([3])
    ds.render_images([3])
    assert counter.count == 5  # rendered once, then read from its file
    ds.pixel_cache.path(0, 3).unlink()
    ds.render_images([3])
    assert counter.count == 6


def test_materialize_verifies_every_cached_file_once(ds, monkeypatch):
    import hmac

    from d3mfmt import pixelcache

    ds.materialize(progress=False)
    ds.pixel_cache.path(1, 0).write_bytes(b"damaged")
    calls = []
    real_new = hmac.new
    monkeypatch.setattr(pixelcache.hmac, "new", lambda *a, **k: calls.append(1) or real_new(*a, **k))
    fresh = _fresh(ds)
    fresh.memory_cache_bytes = 0
    counter = RenderCounter(fresh)
    fresh.materialize(progress=False)
    assert counter.count == 1  # the damaged file, rendered again here and not later in a worker
    hashed = len(calls)
    assert hashed == 11 + 2  # 11 good files verified; the new one tagged, then read back once
    items = [fresh[k] for k in range(len(fresh))]
    assert len(calls) == hashed and counter.count == 1  # a whole epoch from the files: no hashing, no rendering
    assert all(torch.equal(x, ds[k][0]) for k, (x, _, _) in enumerate(items))


def test_rendered_and_cached_pixels_are_the_renderers_values_exactly(ds):
    direct = ds.regenerator.render(1, [int(ds.archive.seeds[1, 2])])[0]  # float32 on the 8-bit grid
    assert torch.equal(ds.render_images([6])[6], direct)  # rendered now, through the uint8 LRU
    fresh = _fresh(ds)
    assert torch.equal(fresh.render_images([6])[6], direct)  # read from the cache file
    assert torch.equal(fresh[6 * 4 + 3][0], direct[:, 16:, 16:])
