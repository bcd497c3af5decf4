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


def test_top_k_order_is_a_stable_descending_sort():
    """The writer's top-k selection picks exactly what a stable argsort of -p would, ties and zeros included."""
    from d3mfmt.labels import _top_indices

    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, 1e-45, 1e-38, 0.25, 0.5, 1.0, 3.4e38], dtype=np.float32)
    for trial in range(200):
        rows, classes = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        k = int(rng.integers(1, classes + 1))
        p = [rng.random((rows, classes)), rng.integers(0, 4, (rows, classes)) / 4,
             rng.choice(specials, (rows, classes))][trial % 3].astype(np.float32)
        want = np.argsort(-p, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(_top_indices(p, k), want)


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


# -- hostile payloads: bounded memory -------------------------------------------


def rle_frame(size: int, byte: int) -> bytes:
    """A tiny zstd frame that expands to ``size`` copies of ``byte`` (RLE blocks of 128 KiB)."""
    out = bytearray((0xFD2FB528).to_bytes(4, "little") + bytes([0xE0]) + size.to_bytes(8, "little"))
    block = 1 << 17
    for start in range(0, size, block):
        n = min(block, size - start)
        last = start + n >= size
        out += (int(last) | (1 << 1) | (n << 3)).to_bytes(3, "little") + bytes([byte])
    return bytes(out)


def peak_of(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_two_gib_dense_payload_is_refused_by_the_default_cap_without_allocating():
    # 1,448 classes x 256 patches each, dense f32: a 2 GiB payload in a 64 KB frame
    enc, classes = LabelEncoding("dense", None, "f32"), 1448
    rows = classes * 256
    frame = rle_frame(enc.payload_size(rows, classes), 0x3C)
    assert len(frame) < 70_000 and enc.payload_size(rows, classes) > 2_000_000_000
    with pytest.raises(D3MFormatError, match="exceeds this reader's cap of 268435456 bytes; .*max_label_bytes="):
        decompress(frame, enc, rows, classes)
    _, peak = peak_of(lambda: pytest.raises(D3MFormatError, decompress, frame, enc, rows, classes))
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "enc, classes, rows",
    [
        (LabelEncoding("dense", None, "f32"), 1024, 1 << 15),  # 128 MiB of float32 values
        (LabelEncoding("topk", 300, "f16"), 300, 1 << 17),  # k = C: 75 MiB of indices + values
    ],
)
def test_decoding_peaks_near_the_table_size(enc, classes, rows):
    size = enc.payload_size(rows, classes)
    if enc.kind == "topk":  # a valid payload: every row lists 0..C-1, all with the same value
        idx = np.tile(np.arange(classes, dtype="<u2"), rows).tobytes()
        frame = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(idx + b"\x00\x1c" * (rows * classes))
    else:
        frame = rle_frame(size, 0x3C)
    table, peak = peak_of(lambda: decompress(frame, enc, rows, classes))
    assert table.rows == rows
    assert peak < size * 1.15 + (8 << 20), (peak, size)  # the table itself plus a few MiB of scratch


def test_cap_is_configurable_for_huge_trusted_archives():
    enc, classes, rows = LabelEncoding("dense", None, "f32"), 16, 1024
    frame = rle_frame(enc.payload_size(rows, classes), 0x3C)
    with pytest.raises(D3MFormatError, match="cap of 1000 bytes"):
        decompress(frame, enc, rows, classes, max_bytes=1000)
    assert decompress(frame, enc, rows, classes, max_bytes=1 << 20).rows == rows


def test_skippable_frames_dictionaries_and_multiframe_are_refused():
    enc = LabelEncoding("topk", 2, "f16")
    frame = compress(encode(peaked(rows=4), enc))
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"abcd"
    with pytest.raises(D3MFormatError, match="skippable"):
        decompress(skippable + frame, enc, 4, 10)
    with pytest.raises(D3MFormatError, match="exactly one complete zstd frame"):
        decompress(frame + frame, enc, 4, 10)
    with pytest.raises(D3MFormatError, match="exactly one complete zstd frame"):
        decompress(frame + skippable, enc, 4, 10)
    with_dict = bytearray(frame)
    with_dict[4] |= 0x01  # dictionary-id flag: one byte of dictionary id follows
    with_dict[5:5] = b"\x07"
    with pytest.raises(D3MFormatError):
        decompress(bytes(with_dict), enc, 4, 10)


# -- the writer applies exactly the reader's rules ------------------------------


def test_topk_k_equals_c_u8_is_refused_up_front_with_the_codec_to_use():
    with pytest.raises(D3MFormatError, match=r"cannot represent a uniform row .* use values \['f16', 'u8sqrt'\]"):
        LabelEncoding("topk", 300, "u8").check(300)
    LabelEncoding("topk", 255, "u8").check(255)
    LabelEncoding("topk", 300, "u8sqrt").check(300)
    LabelEncoding("topk", 5, "u8").check(300)  # unlisted mass keeps every row decodable
    with pytest.raises(D3MFormatError, match="cannot represent a uniform row"):
        encode(np.full((2, 300), 1 / 300, dtype=np.float32), LabelEncoding("topk", 300, "u8"))


@pytest.mark.parametrize(
    "probs, enc, msg",
    [
        (np.zeros((2, 4)), LabelEncoding("dense", None, "f32"), "labels must be probability rows"),
        (np.full((1, 4), 1e-30), LabelEncoding("dense", None, "f16"), r"use values \['f32'\]"),
        (np.full((1, 4), 1e-4), LabelEncoding("topk", 4, "u8"), r"use values \['f16', 'u8sqrt'\]"),
        (np.full((1, 4), 1e-6), LabelEncoding("topk", 4, "u8sqrt"), r"use values \['f16'\]"),
    ],
)
def test_rows_the_reader_would_refuse_are_refused_at_encode(probs, enc, msg):
    with pytest.raises(D3MFormatError, match=msg):
        encode(probs, enc)


def test_random_round_trips_never_write_what_the_reader_rejects():
    rng = np.random.default_rng(7)
    encodings = [("dense", "f32"), ("dense", "f16"), ("topk", "f16"), ("topk", "u8"), ("topk", "u8sqrt"), ("hard", None)]
    written = 0
    for _ in range(400):
        classes = int(rng.integers(2, 300))
        rows = int(rng.integers(1, 6))
        scale = 10.0 ** rng.uniform(-45, 0)  # down to float32 denormals
        probs = (rng.dirichlet(np.full(classes, rng.uniform(0.05, 5)), rows) * scale).astype(np.float32)
        probs[rng.random(rows) < 0.1] = 0
        kind, values = encodings[rng.integers(len(encodings))]
        k = {"dense": None, "hard": 1}.get(kind, int(rng.choice([1, classes, rng.integers(1, classes + 1)])))
        enc = LabelEncoding(kind, k, values)
        try:
            table = encode(probs, enc)
        except D3MFormatError:
            continue
        decompress(compress(table), enc, rows, classes)  # must not raise
        written += 1
    assert written > 100


def test_a_frame_of_a_million_empty_blocks_is_decoded_quickly():
    import time

    enc = LabelEncoding("topk", 2, "u8")
    payload = np.array([[0, 1], [2, 3]], dtype=np.uint8).tobytes() + bytes([200, 20, 200, 20])
    empty_raw_block = (0 | (0 << 1) | (0 << 3)).to_bytes(3, "little")
    last = (1 | (0 << 1) | (len(payload) << 3)).to_bytes(3, "little") + payload
    frame = (0xFD2FB528).to_bytes(4, "little") + bytes([0xE0]) + len(payload).to_bytes(8, "little")
    frame += empty_raw_block * 1_000_000 + last
    t0 = time.monotonic()
    assert decompress(frame, enc, 2, 10).indices.tolist() == [[0, 1], [2, 3]]
    assert time.monotonic() - t0 < 1.0


def test_a_hand_made_table_with_the_wrong_layout_is_refused_before_writing():
    from d3mfmt.labels import LabelTable, check_rows

    enc = LabelEncoding("topk", 2, "u8")
    good = encode(peaked(rows=4), enc)
    for indices, values in [
        (good.indices.astype(np.uint16), good.values),  # the index dtype for 10 classes is uint8
        (good.indices, good.values[:, :1].copy()),  # one value per row, k = 2
        (good.indices, None),
    ]:
        with pytest.raises(D3MFormatError, match="must be"):
            check_rows(LabelTable(enc, 10, indices, values), where="labels")
