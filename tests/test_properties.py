"""Property-based round trips: writer -> reader on random valid content."""

import numpy as np
from conftest import make_archive
from hypothesis import given, settings
from hypothesis import strategies as st

import d3mfmt
from d3mfmt import LabelEncoding

encodings = st.one_of(
    st.builds(LabelEncoding, st.just("dense"), st.none(), st.sampled_from(["f16", "f32"])),
    st.builds(LabelEncoding, st.just("hard"), st.just(1), st.none()),
    st.builds(LabelEncoding, st.just("topk"), st.integers(1, 6), st.sampled_from(["f16", "u8", "u8sqrt"]),
              st.floats(0.5, 8.0)),
)


@settings(max_examples=60, deadline=None)
@given(
    num_classes=st.integers(1, 7),
    ipc=st.integers(1, 3),
    grid=st.integers(1, 3),
    n_vectors=st.integers(1, 3),
    dim=st.integers(1, 16),
    encoding=encodings,
    fingerprint_size=st.sampled_from([None, 1, 2, 4]),
    emb_dtype=st.sampled_from(["float16", "float32"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip(num_classes, ipc, grid, n_vectors, dim, encoding, fingerprint_size, emb_dtype, seed):
    src = make_archive(num_classes, ipc, grid, n_vectors, dim, encoding, fingerprint_size, seed, emb_dtype)
    data = d3mfmt.save(src)
    got = d3mfmt.load(data)
    np.testing.assert_array_equal(got.embeddings, src.embeddings)
    np.testing.assert_array_equal(got.seeds, src.seeds)
    if fingerprint_size is None:
        assert got.fingerprints is None
    else:
        np.testing.assert_array_equal(got.fingerprints, src.fingerprints)
    np.testing.assert_array_equal(got.labels.dense(), src.labels.dense())
    np.testing.assert_allclose(got.labels.dense().sum(1), 1.0, atol=1e-5)
    assert got.manifest.dataset == src.manifest.dataset
    assert d3mfmt.save(got) == data
