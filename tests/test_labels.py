"""The soft-label codec: encode/decode rules, zstd framing, bounds."""

import numpy as np
import pytest
import zstandard

from d3mfmt import D3MFormatError, LabelEncoding
from d3mfmt.labels import compress, decompress, encode


def peaked(rows=50, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (rows, classes))
    logits[:, 0] += 4
    return (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    "enc",
    [
        LabelEncoding("dense", None, "f32"),
        LabelEncoding("dense", None, "f16"),
        LabelEncoding("hard", 1, None),
        LabelEncoding("topk", 3, "f16"),
        LabelEncoding("topk", 5, "u8"),
        LabelEncoding("topk", 5, "u8sqrt"),
        LabelEncoding("topk", 10, "u8sqrt"),
    ],
)
def test_decoded_rows_are_distributions_with_the_same_top1(enc):
    p = peaked()
    table = decompress(compress(encode(p, enc)), enc, len(p), 10)
    q = table.dense()
    assert q.dtype == np.float32 and q.shape == p.shape
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-6)
    assert np.all(q >= 0)
    np.testing.assert_array_equal(table.top1(), p.argmax(1))
    # the true top-1 keeps the largest decoded value (quantisation may tie it)
    np.testing.assert_array_equal(q[np.arange(len(p)), p.argmax(1)], q.max(1))


def test_dense_f32_is_exact_and_hard_is_one_hot():
    p = peaked()
    q = encode(p, LabelEncoding("dense", None, "f32")).dense()
    np.testing.assert_allclose(q, p / p.sum(1, keepdims=True), rtol=1e-6)
    h = encode(p, LabelEncoding("hard", 1, None)).dense()
    np.testing.assert_array_equal(h, np.eye(10, dtype=np.float32)[p.argmax(1)])


def test_topk_decode_rule_spreads_the_rest_evenly():
    p = np.array([[0.5, 0.3, 0.1, 0.06, 0.04]], dtype=np.float32)
    enc = LabelEncoding("topk", 2, "f16")
    t = encode(p, enc)
    assert t.indices.tolist() == [[0, 1]]
    q = t.dense()[0]
    np.testing.assert_allclose(q[:2], [0.5, 0.3], atol=1e-3)
    np.testing.assert_allclose(q[2:], [(1 - q[0] - q[1]) / 3] * 3, rtol=1e-6)


def test_quantisation_rounds_down_so_unlisted_classes_keep_mass():
    p = np.array([[0.9999, 0.00005, 0.00005]], dtype=np.float32)
    for values in ("f16", "u8", "u8sqrt"):
        q = encode(p, LabelEncoding("topk", 1, values)).dense()[0]
        assert q[1] > 0 and q[2] > 0 and q[0] <= 0.9999 + 1e-7, values


def test_u8sqrt_is_finer_than_u8_for_small_probabilities():
    p = peaked(rows=500)
    err = {}
    for values in ("u8", "u8sqrt"):
        q = encode(p, LabelEncoding("topk", 5, values)).dense()
        err[values] = np.sum(p * np.log(p / np.maximum(q, 1e-12)), 1).mean()
    assert err["u8sqrt"] < err["u8"] / 2


def test_ties_break_toward_the_lower_index():
    p = np.array([[0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
    assert encode(p, LabelEncoding("topk", 2, "f16")).indices.tolist() == [[0, 1]]


def forged_frame(declared: int) -> bytes:
    """A zstd frame header declaring ``declared`` bytes, then one empty raw block."""
    magic = (0xFD2FB528).to_bytes(4, "little")
    descriptor = bytes([0xE0])  # 8-byte content size, single segment, no checksum
    return magic + descriptor + declared.to_bytes(8, "little") + b"\x01\x00\x00"


def test_frame_declaring_a_huge_size_is_rejected_before_allocation():
    import tracemalloc

    enc = LabelEncoding("topk", 2, "f16")
    assert zstandard.frame_content_size(forged_frame(1 << 40)) == 1 << 40
    tracemalloc.start()
    with pytest.raises(D3MFormatError, match="declares 1099511627776 bytes, the manifest implies 24 bytes"):
        decompress(forged_frame(1 << 40), enc, 4, 10)
    with pytest.raises(D3MFormatError, match="declares no size"):
        decompress(zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 16), enc, 4, 10)
    with pytest.raises(D3MFormatError, match="exceeds the limit"):
        decompress(forged_frame(1 << 40), LabelEncoding("dense", None, "f32"), 1 << 28, 100_000)
    # declared size matches but the frame holds less: an error, not a short read
    with pytest.raises(D3MFormatError):
        decompress(forged_frame(24), enc, 4, 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_trailing_data_and_corrupt_frames_are_rejected():
    enc = LabelEncoding("topk", 2, "f16")
    p = peaked(rows=4)
    frame = compress(encode(p, enc))
    with pytest.raises(D3MFormatError, match="exactly one complete zstd frame"):
        decompress(frame + b"junk", enc, 4, 10)
    with pytest.raises(D3MFormatError):
        decompress(frame[:-6], enc, 4, 10)
    with pytest.raises(D3MFormatError, match="not a zstd frame"):
        decompress(b"nonsense-bytes", enc, 4, 10)


def test_indices_out_of_range_and_duplicates_are_rejected():
    enc = LabelEncoding("topk", 2, "u8")
    bad = np.array([[3, 10], [1, 2]], dtype=np.uint8).tobytes() + bytes([200, 20, 200, 20])
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bad)
    with pytest.raises(D3MFormatError, match="class index 10 >= number of classes 10"):
        decompress(frame, enc, 2, 10)
    dup = np.array([[3, 3], [1, 2]], dtype=np.uint8).tobytes() + bytes([200, 20, 200, 20])
    with pytest.raises(D3MFormatError, match="same class index twice"):
        decompress(zstandard.ZstdCompressor().compress(dup), enc, 2, 10)


def test_float_values_must_be_probabilities():
    enc = LabelEncoding("dense", None, "f16")
    vals = np.array([[0.5, np.nan]], dtype="<f2").tobytes()
    with pytest.raises(D3MFormatError, match="finite probabilities"):
        decompress(zstandard.ZstdCompressor().compress(vals), enc, 1, 2)


@pytest.mark.parametrize(
    "enc, msg",
    [
        (LabelEncoding("topk", 11, "f16"), r"k must be in 1\.\.10"),
        (LabelEncoding("topk", 3, "f32"), "values must be one of"),
        (LabelEncoding("dense", 3, "f16"), "k must be null"),
        (LabelEncoding("hard", 2, None), "k=1 and values=null"),
        (LabelEncoding("soft", 2, "f16"), "encoding must be one of"),
        (LabelEncoding("topk", 2, "f16", temperature=0.0), "temperature"),
    ],
)
def test_invalid_encodings_name_the_field(enc, msg):
    with pytest.raises(D3MFormatError, match=msg):
        enc.check(10)


def test_index_dtype_is_the_narrowest_that_fits():
    enc = LabelEncoding("topk", 1, "u8")
    assert enc.index_dtype(256) == "uint8"
    assert enc.index_dtype(257) == "uint16"
    assert enc.index_dtype(65537) == "uint32"
