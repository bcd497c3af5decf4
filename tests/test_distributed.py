"""Consumers on many ranks: materialize() split across a real gloo process group, the sampler, LOCAL_RANK devices."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import CPU

from d3mfmt import D3MDataset, D3MError
from d3mfmt.devices import default_device
from d3mfmt.distributed import D3MDistributedSampler

WORLD = 2


def _rank_main(rank: int, archive: str, work: str) -> None:
    """One rank: materialize() into a shared cache, a sampler-driven first epoch, materialize() into its own cache."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{work}/rendezvous", rank=rank, world_size=WORLD)
    try:
        # 1. materialize: each rank renders its share, then waits for the others
        ds = D3MDataset(archive, cache_dir=Path(work) / "materialized", render=CPU, render_batch=4)
        ds.materialize(progress=False)
        pixels = {idx: x.tolist() for idx, x in ds.render_images(range(ds.num_classes * ds.ipc)).items()}
        materialized = ds.images_rendered
        # 2. no materialize: a first epoch through D3MDistributedSampler renders only this rank's images
        lazy = D3MDataset(archive, cache_dir=Path(work) / "lazy", render=CPU, render_batch=4)
        sampler = D3MDistributedSampler(lazy, shuffle=True, seed=3)
        seen = [int(c) for _, _, classes in DataLoader(lazy, batch_size=5, sampler=sampler) for c in classes]
        # 3. a cache folder per rank (not shared): each rank warns, then renders the others' images too
        import warnings

        apart = D3MDataset(archive, cache_dir=Path(work) / f"apart{rank}", render=CPU, render_batch=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apart.materialize(progress=False)
        result = {"materialized": materialized, "lazy": lazy.images_rendered, "items": list(sampler),
                  "images": sampler.images(), "seen": len(seen), "pixels_after": ds.images_rendered,
                  "apart": apart.images_rendered, "warnings": [str(w.message) for w in caught]}
        (Path(work) / f"rank{rank}.json").write_text(json.dumps(result))
        (Path(work) / f"pixels{rank}.json").write_text(json.dumps(pixels))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_render_each_image_exactly_once(tiny_archive_path, tmp_path):
    torch.multiprocessing.spawn(_rank_main, args=(str(tiny_archive_path), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    images = 12  # tiny archive: 3 classes x IPC 4
    # 1. materialize: image i on rank i % 2, once in total, and every rank then reads all of them
    assert [r["materialized"] for r in ranks] == [6, 6]
    assert [r["pixels_after"] for r in ranks] == [6, 6]  # reading the other rank's images rendered nothing
    assert len(list((tmp_path / "materialized").glob("*/*.npy"))) == images
    reference = D3MDataset(tiny_archive_path, cache_dir=tmp_path / "reference", render=CPU)
    expected = reference.render_images(range(images))
    for r in range(WORLD):
        pixels = json.loads((tmp_path / f"pixels{r}.json").read_text())
        assert all(torch.equal(torch.tensor(pixels[str(i)]), expected[i]) for i in range(images))
    # 2. the sampler's first epoch: every image rendered once across ranks, every patch seen
    assert sum(r["lazy"] for r in ranks) == images
    assert sorted(ranks[0]["images"] + ranks[1]["images"]) == list(range(images))
    assert sorted(ranks[0]["items"] + ranks[1]["items"]) == list(range(images * 4))
    assert [r["seen"] for r in ranks] == [24, 24]
    # 3. caches not shared: said, and still complete
    assert [r["apart"] for r in ranks] == [12, 12]
    for r, rank in enumerate(ranks):
        assert len(rank["warnings"]) == 1 and f"rank {r}: 6 images the other ranks rendered are not in" in \
            rank["warnings"][0] and "cache_dir every rank can read and write" in rank["warnings"][0]


# -- the sampler, without a process group -----------------------------------------


@pytest.fixture
def ds(tiny_archive_path, tmp_path):
    return D3MDataset(tiny_archive_path, cache_dir=tmp_path, render=CPU)


@pytest.mark.parametrize("world", [1, 2, 5, 7])
def test_the_sampler_deals_whole_images_and_equal_lengths(ds, world):
    g2 = 4
    for epoch in (0, 1):
        parts = []
        for rank in range(world):
            sampler = D3MDistributedSampler(ds, num_replicas=world, rank=rank, seed=1)
            sampler.set_epoch(epoch)
            parts.append(list(sampler))
            assert len(parts[-1]) == len(sampler) == -(-12 // world) * g2
            own = set(sampler.images())
            assert {k // g2 for k in parts[-1]} == own  # only its own images, padding included
            assert set(parts[-1]) == {img * g2 + j for img in own for j in range(g2)}  # all of their patches
        owners = [set(k // g2 for k in part) for part in parts]
        assert sum(len(o) for o in owners) == 12 and set().union(*owners) == set(range(12))  # each image on one rank
    # reshuffled by set_epoch, the same for the same epoch
    a, b = (D3MDistributedSampler(ds, num_replicas=world, rank=0, seed=1) for _ in range(2))
    b.set_epoch(1)
    assert list(a) == list(D3MDistributedSampler(ds, num_replicas=world, rank=0, seed=1))
    assert list(a) != list(b)


def test_the_sampler_without_shuffle_matches_materialize_and_drop_last(ds, tiny_archive_path, tmp_path):
    sampler = D3MDistributedSampler(ds, num_replicas=5, rank=1, shuffle=False)
    assert sampler.images() == [1, 6, 11] and list(sampler)[:4] == [4, 5, 6, 7]
    dropped = D3MDistributedSampler(ds, num_replicas=5, rank=1, shuffle=False, drop_last=True)
    assert dropped.images() == [1, 6] and len(dropped) == 8
    collages = D3MDataset(tiny_archive_path, unit="image", cache_dir=tmp_path, render=CPU)
    assert sorted(D3MDistributedSampler(collages, num_replicas=2, rank=0)) == sorted(
        D3MDistributedSampler(collages, num_replicas=2, rank=0).images())
    more_ranks = D3MDistributedSampler(collages, num_replicas=16, rank=13)  # fewer images than ranks
    assert len(list(more_ranks)) == len(more_ranks) == 1


def test_the_sampler_refuses_bad_arguments(ds):
    with pytest.raises(D3MError, match=r"rank must be in 0..1 for num_replicas=2, got 2"):
        D3MDistributedSampler(ds, num_replicas=2, rank=2)
    with pytest.raises(D3MError, match="num_replicas must be an integer >= 1, got 0"):
        D3MDistributedSampler(ds, num_replicas=0, rank=0)
    with pytest.raises(D3MError, match="epoch must be an integer >= 0"):
        D3MDistributedSampler(ds, num_replicas=1, rank=0).set_epoch(-1)
    assert len(D3MDistributedSampler(ds)) == len(ds)  # no process group: one rank, everything


# -- LOCAL_RANK -------------------------------------------------------------------------


def test_the_default_device_follows_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a 4-GPU node
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_device({}) == "cuda"
    assert default_device({"LOCAL_RANK": "2"}) == "cuda:2"
    with pytest.raises(D3MError, match=r"LOCAL_RANK=5, but this process sees 4 CUDA devices"):
        default_device({"LOCAL_RANK": "5"})
    with pytest.raises(D3MError, match="LOCAL_RANK must be a non-negative integer, got 'x'"):
        default_device({"LOCAL_RANK": "x"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per process (CUDA_VISIBLE_DEVICES)
    assert default_device({"LOCAL_RANK": "3"}) == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device({"LOCAL_RANK": "3"}) == "cpu"


def test_a_dataset_under_a_launcher_renders_on_its_local_rank_gpu(tiny_archive_path, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setitem(os.environ, "LOCAL_RANK", "6")
    ds = D3MDataset(tiny_archive_path, cache_dir=tmp_path)
    assert ds.render.device == "cuda:6" and ds.render.dtype == "float16"
