"""Writer/reader round trips, determinism, atomic output, content hash."""

import os

import numpy as np
import pytest
from conftest import make_archive

import d3mfmt
from d3mfmt import LabelEncoding
from d3mfmt.container import MAGIC_OFFSET, MEDIA_TYPE, MEMBER_ORDER, read_zip


def test_round_trip_preserves_everything(archive_bytes):
    a = d3mfmt.load(archive_bytes)
    src = make_archive()
    np.testing.assert_array_equal(a.embeddings, src.embeddings)
    np.testing.assert_array_equal(a.seeds, src.seeds)
    np.testing.assert_array_equal(a.fingerprints, src.fingerprints)
    np.testing.assert_array_equal(a.labels.indices, src.labels.indices)
    np.testing.assert_array_equal(a.labels.values, src.labels.values)
    assert a.manifest.dataset == src.manifest.dataset
    assert a.manifest.generator == src.manifest.generator
    assert set(a.manifest.members) == {"tensors.safetensors", "labels.zst"}


def test_same_content_gives_identical_bytes(archive_bytes):
    assert d3mfmt.save(make_archive()) == archive_bytes
    assert d3mfmt.save(d3mfmt.load(archive_bytes)) == archive_bytes


def test_member_order_media_type_at_fixed_offset_all_stored(archive_bytes):
    assert archive_bytes[MAGIC_OFFSET : MAGIC_OFFSET + len(MEDIA_TYPE)] == MEDIA_TYPE
    assert tuple(read_zip(archive_bytes)) == MEMBER_ORDER


def test_scheduler_config_key_order_does_not_change_bytes():
    a = make_archive()
    cfg = a.manifest.generator.scheduler_config
    reordered = dict(reversed(list({**cfg, "beta_start": 0.001, "clip_sample": False}.items())))
    b = make_archive()
    from dataclasses import replace

    def with_cfg(arch, c):
        gen = replace(arch.manifest.generator, scheduler_config=c)
        return replace(arch, manifest=replace(arch.manifest, generator=gen))

    x = d3mfmt.save(with_cfg(a, {**cfg, "beta_start": 0.001, "clip_sample": False}))
    y = d3mfmt.save(with_cfg(b, reordered))
    assert x == y


def test_content_hash_ignores_build_provenance_but_tracks_content():
    from dataclasses import replace

    a = make_archive()
    h = d3mfmt.load(d3mfmt.save(a)).content_hash
    later = replace(a, manifest=replace(a.manifest, build={"created": "2026-11-25T00:00:00Z"}))
    assert d3mfmt.load(d3mfmt.save(later)).content_hash == h
    seeds = a.seeds.copy()
    seeds[0, 0] += 1
    assert d3mfmt.load(d3mfmt.save(replace(a, seeds=seeds))).content_hash != h


def test_save_file_is_atomic_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "x.d3m"
    d3mfmt.save_file(make_archive(), path)
    assert d3mfmt.load_file(path).manifest.dataset.ipc == 2
    before = path.read_bytes()
    bad = make_archive()
    from dataclasses import replace

    bad = replace(bad, seeds=bad.seeds.astype(np.int32))
    with pytest.raises(d3mfmt.D3MFormatError, match="seeds"):
        d3mfmt.save_file(bad, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x.d3m"]
    with pytest.raises(d3mfmt.D3MError, match="does not exist"):  # an output problem, not a format one
        d3mfmt.save_file(make_archive(), tmp_path / "missing" / "y.d3m")


def test_writer_rejects_inconsistent_objects():
    from dataclasses import replace

    a = make_archive()
    with pytest.raises(d3mfmt.D3MFormatError, match="embeddings contain NaN"):
        emb = a.embeddings.copy()
        emb[0, 0, 0] = np.nan
        d3mfmt.save(replace(a, embeddings=emb))
    with pytest.raises(d3mfmt.D3MFormatError, match="fingerprints present iff"):
        d3mfmt.save(replace(a, fingerprints=None))
    with pytest.raises(d3mfmt.D3MFormatError, match="label table"):
        d3mfmt.save(replace(a, labels=make_archive(encoding=LabelEncoding("hard", 1, None)).labels))


def test_soft_label_addresses_patch_row():
    a = d3mfmt.load(d3mfmt.save(make_archive(num_classes=3, ipc=2, grid=2)))
    dense = a.labels.dense()
    assert dense.shape == (3 * 2 * 4, 3)
    np.testing.assert_array_equal(a.soft_label(2, 1, 3), dense[(2 * 2 + 1) * 4 + 3])
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-6)


def test_reading_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, d3mfmt, d3mfmt.cli, d3mfmt.summary; "
        "d3mfmt.load_file('spec/vectors/topk.d3m'); "
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_writer_refuses_what_the_reader_would_reject():
    from dataclasses import replace

    from d3mfmt import ClassInfo

    a = make_archive()
    ds = a.manifest.dataset
    long_name = replace(ds, classes=(ClassInfo("c0", "x" * 300),) + ds.classes[1:])
    for manifest, field in [
        (replace(a.manifest, dataset=long_name), r"dataset.classes\[0\].name"),
        (replace(a.manifest, generator=replace(a.manifest.generator, steps=5000)), "generator.steps"),
        (replace(a.manifest, labels=replace(a.manifest.labels, temperature=1e-7)), "labels.temperature"),
    ]:
        with pytest.raises(d3mfmt.D3MFormatError, match=field):
            d3mfmt.save(replace(a, manifest=manifest))


def test_unknown_member_names_are_refused_and_unknown_entry_keys_ignored(archive_bytes):
    # SPEC "Manifest fields": `members` holds only the two payload members (no other member exists in a 1.x
    # container, so another name could only make two readers hash different things); keys inside an entry
    # are ignored like any unknown key (a minor version may add, say, another digest)
    from conftest import with_manifest

    extra = with_manifest(archive_bytes, lambda d: d["members"].__setitem__("future.bin", {"size": 1, "sha256": "0" * 64}))
    with pytest.raises(d3mfmt.D3MFormatError, match=r"members may hold only .*'future.bin'"):
        d3mfmt.load(extra)
    for name in ("mimetype", "manifest.json"):
        listed = with_manifest(archive_bytes, lambda d: d["members"].__setitem__(name, {"size": 1, "sha256": "0" * 64}))
        with pytest.raises(d3mfmt.D3MFormatError, match="members may hold only"):
            d3mfmt.load(listed)
    digest = with_manifest(archive_bytes, lambda d: d["members"]["labels.zst"].__setitem__("blake3", "x"))
    assert d3mfmt.load(digest).content_hash == d3mfmt.load(archive_bytes).content_hash
