"""Soft-label codec: encodings, their byte layout, and the zstd framing.

A label table holds one probability vector over the archive's classes for every
patch (``rows = classes * ipc * grid**2``, row ``(c * ipc + i) * grid**2 + j``).
Three encodings exist (``ENCODINGS``); spec/SPEC.md ("Label encoding") is the
authority on their bytes and on the decode rule implemented in ``decode_dense``.

Example:
    >>> import numpy as np
    >>> probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    >>> table = encode(probs, LabelEncoding(kind="topk", k=2, values="f16"))
    >>> table.dense().astype(float).round(2).tolist()
    [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

from .errors import D3MFormatError
from .jsonfields import canonical_float

# Value codecs: name -> (stored dtype, allowed in which encodings).
VALUE_CODECS = {
    "f32": np.dtype("<f4"),  # dense only: full precision, to price the encoding
    "f16": np.dtype("<f2"),
    "u8": np.dtype("u1"),  # q = floor(255 * p)
    "u8sqrt": np.dtype("u1"),  # q = floor(255 * sqrt(p)): finer steps near 0
}
DENSE_VALUE_CODECS = ("f32", "f16")
TOPK_VALUE_CODECS = ("f16", "u8", "u8sqrt")
INDEX_DTYPES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
ENCODINGS = ("dense", "topk", "hard")

ZSTD_LEVEL = 19
ZSTD_MAGIC = 0xFD2FB528
MAX_LABEL_PAYLOAD = 1 << 31  # decompressed bytes: the format's limit (SPEC.md "Limits")
MAX_LABEL_TABLE = 256 << 20  # the reader's default cap on the decoded table; callers may raise it to MAX_LABEL_PAYLOAD
CHUNK_ELEMENTS = 1 << 20  # label entries checked or decoded at a time, so scratch memory stays a few MiB


@dataclass(frozen=True)
class LabelEncoding:
    """How the label table is stored.

    Args:
        kind: ``"dense"`` (every class), ``"topk"`` (k largest + rest spread
            evenly) or ``"hard"`` (one class index, decoded one-hot).
        k: entries kept per row for ``topk`` (1 for ``hard``, None for dense).
        values: value codec name (``VALUE_CODECS``); ``None`` for ``hard``.
        temperature: softmax temperature the teacher's logits were divided by
            (recorded, not used by decoding).
    """

    kind: str = "topk"
    k: int | None = 5
    values: str | None = "u8sqrt"
    temperature: float = 1.0

    def __post_init__(self):
        # canonical at construction: temperature=1 in code is the 1.0 a reload gives (same bytes, same hash)
        object.__setattr__(self, "temperature", canonical_float(self.temperature))

    def check(self, num_classes: int) -> None:
        """Raise D3MFormatError unless this encoding is valid for ``num_classes``."""
        where = "manifest.json: labels"
        if self.kind not in ENCODINGS:
            raise D3MFormatError(f"{where}.encoding must be one of {list(ENCODINGS)}, got {self.kind!r}")
        if self.kind != "dense" and (isinstance(self.k, bool) or not isinstance(self.k, int)):
            raise D3MFormatError(f"{where}.k must be an integer for {self.kind}, got {self.k!r}")
        if self.kind == "hard":
            if self.values is not None or self.k != 1:
                raise D3MFormatError(f"{where}: encoding 'hard' takes k=1 and values=null, got k={self.k}, values={self.values!r}")
        elif self.kind == "dense":
            if self.values not in DENSE_VALUE_CODECS:
                raise D3MFormatError(f"{where}.values must be one of {list(DENSE_VALUE_CODECS)} for dense, got {self.values!r}")
            if self.k is not None:
                raise D3MFormatError(f"{where}.k must be null for dense, got {self.k}")
        else:
            if self.values not in TOPK_VALUE_CODECS:
                raise D3MFormatError(f"{where}.values must be one of {list(TOPK_VALUE_CODECS)} for topk, got {self.values!r}")
            if not 1 <= self.k <= num_classes:
                raise D3MFormatError(f"{where}.k must be in 1..{num_classes} for topk, got {self.k}")
            if self.k == num_classes and not _represents_uniform(self.values, num_classes):
                fits = [v for v in TOPK_VALUE_CODECS if _represents_uniform(v, num_classes)]
                raise D3MFormatError(
                    f"{where}: topk with k = C = {num_classes} and values {self.values!r} cannot represent a uniform row "
                    f"(1/{num_classes} rounds down to 0, leaving the row no mass); use values {fits} or k < {num_classes}"
                )
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise D3MFormatError(f"{where}.temperature must be a positive finite number, got {self.temperature}")

    def index_dtype(self, num_classes: int) -> str | None:
        """The narrowest index dtype that holds every class index (None for dense)."""
        if self.kind == "dense":
            return None
        for name, dtype in INDEX_DTYPES.items():
            if num_classes - 1 <= np.iinfo(dtype).max:
                return name
        raise D3MFormatError(f"too many classes for an index: {num_classes}")

    def payload_size(self, rows: int, num_classes: int) -> int:
        """Bytes of the uncompressed payload for ``rows`` label rows."""
        value_bytes = 0 if self.values is None else VALUE_CODECS[self.values].itemsize
        if self.kind == "dense":
            return rows * num_classes * value_bytes
        index_bytes = INDEX_DTYPES[self.index_dtype(num_classes)].itemsize
        return rows * self.k * (index_bytes + value_bytes)


@dataclass(frozen=True, eq=False)
class LabelTable:
    """Decoded-on-demand label rows: ``indices`` [rows, k] and/or ``values``."""

    encoding: LabelEncoding
    num_classes: int
    indices: np.ndarray | None  # [rows, k] (topk), [rows] (hard), None (dense)
    values: np.ndarray | None  # [rows, k] (topk), [rows, C] (dense), None (hard)

    @property
    def rows(self) -> int:
        return len(self.indices if self.indices is not None else self.values)

    def dense(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Decode rows (all by default) to float32 probabilities [n, C] summing to 1."""
        sel = slice(None) if rows is None else rows
        indices = None if self.indices is None else self.indices[sel]
        values = None if self.values is None else self.values[sel]
        n = len(indices if indices is not None else values)
        out = np.empty((n, self.num_classes), dtype=np.float32)
        for part in _row_chunks(n, self.num_classes):  # float64 scratch for a chunk, not the table
            out[part] = decode_dense(
                self.encoding,
                self.num_classes,
                None if indices is None else indices[part],
                None if values is None else values[part],
            )
        return out

    def payload(self) -> bytes:
        """The uncompressed payload bytes (indices first, then values)."""
        parts = [a.tobytes() for a in (self.indices, self.values) if a is not None]
        return b"".join(parts)


def _represents_uniform(codec: str, num_classes: int) -> bool:
    """Whether ``codec`` stores 1/C as a positive value: the least a row's largest probability can be."""
    return bool(_quantize_values(codec, np.array([1.0 / num_classes], dtype=np.float32))[0] > 0)


def _quantize_values(codec: str, probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> stored values of ``codec``, rounded toward zero.

    Rounding down makes every decoded value <= the true one, so the listed
    mass never exceeds the true mass of those classes and the decode rule
    gives the unlisted classes a positive share whenever they had one.
    """
    probs = np.clip(probs.astype(np.float64), 0.0, 1.0)
    if codec == "u8":
        return np.floor(probs * 255.0 + 1e-9).astype(np.uint8)
    if codec == "u8sqrt":
        return np.floor(np.sqrt(probs) * 255.0 + 1e-9).astype(np.uint8)
    stored = probs.astype(VALUE_CODECS[codec])
    too_big = stored.astype(np.float64) > probs
    stored[too_big] = np.nextafter(stored[too_big], stored.dtype.type(0))
    return stored


def _row_chunks(rows: int, width: int):
    """Row slices of about CHUNK_ELEMENTS entries each."""
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


def _decode_values(codec: str, stored: np.ndarray) -> np.ndarray:
    """Stored values -> float64 probabilities (before the remaining-mass rule)."""
    if codec == "u8":
        return stored.astype(np.float64) / 255.0
    if codec == "u8sqrt":
        return np.square(stored.astype(np.float64) / 255.0)
    return stored.astype(np.float64)


def encode(probs: np.ndarray, encoding: LabelEncoding) -> LabelTable:
    """Encode probability rows [rows, C] (each summing to ~1) with ``encoding``.

    Top-k keeps the k largest entries per row, ordered by descending
    probability with ties broken by the lower class index, so the same input
    always gives the same bytes.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise D3MFormatError("labels must be a finite, non-negative [rows, classes] array")
    rows, num_classes = probs.shape
    encoding.check(num_classes)
    if encoding.kind == "dense":
        table = LabelTable(encoding, num_classes, None, _quantize_values(encoding.values, probs))
    else:
        index_dtype = INDEX_DTYPES[encoding.index_dtype(num_classes)]
        order = _top_indices(probs, encoding.k)
        if encoding.kind == "hard":
            table = LabelTable(encoding, num_classes, order[:, 0].astype(index_dtype), None)
        else:
            kept = np.take_along_axis(probs, order, axis=1)
            table = LabelTable(encoding, num_classes, order.astype(index_dtype), _quantize_values(encoding.values, kept))
    _check_encoded_mass(table, probs)
    check_rows(table, where="labels")  # the reader's own rules: nothing unreadable leaves the writer
    return table


def _top_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Per row, the ``k`` largest entries' indices by descending probability, ties -> lower index first.

    The same order as a stable argsort of ``-probs``, without sorting every row:
    non-negative float32 bit patterns order like their values, so the key
    ``(~bits << 32) | index`` is unique per entry and ascends exactly in that
    order; a partition picks the ``k`` smallest keys, and only they are sorted.
    """
    keys = np.invert((probs + np.float32(0.0)).view(np.uint32)).astype(np.uint64)  # + 0.0 makes -0.0 0.0
    keys <<= np.uint64(32)
    keys |= np.arange(probs.shape[1], dtype=np.uint64)
    if k < probs.shape[1]:
        keys.partition(k - 1, axis=1)  # in place: the k smallest keys first, in no order
        keys = keys[:, :k]
    keys.sort(axis=1)
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _check_encoded_mass(table: LabelTable, probs: np.ndarray) -> None:
    """Name a codec that can hold a row whose stored values all rounded down to 0."""
    enc = table.encoding
    if enc.values is None or (enc.kind == "topk" and enc.k < table.num_classes):
        return  # hard rows, and top-k rows with unlisted mass, always decode
    for part in _row_chunks(table.rows, table.values.shape[1]):
        empty = np.flatnonzero(_decode_values(enc.values, table.values[part]).sum(axis=1) <= 0)
        if empty.size:
            row = part.start + int(empty[0])
            largest = float(probs[row].max())
            codecs = DENSE_VALUE_CODECS if enc.kind == "dense" else TOPK_VALUE_CODECS
            fits = [c for c in codecs if largest > 0 and _quantize_values(c, np.float32([largest]))[0] > 0]
            fix = f"use values {fits}" if fits else "labels must be probability rows summing to 1"
            raise D3MFormatError(
                f"labels: row {row} has no probability mass after encoding with values {enc.values!r} "
                f"(its largest probability {largest:.3g} rounds down to 0); {fix}"
            )


def decode_dense(encoding: LabelEncoding, num_classes: int, indices, values) -> np.ndarray:
    """The spec's decode rule: stored rows -> float32 [n, C] summing to 1."""
    if encoding.kind == "hard":
        out = np.zeros((len(indices), num_classes), dtype=np.float32)
        out[np.arange(len(indices)), indices.astype(np.int64)] = 1.0
        return out
    p = _decode_values(encoding.values, values)
    if encoding.kind == "dense":
        total = p.sum(axis=1, keepdims=True)
        return (p / total).astype(np.float32)
    n, k = p.shape
    listed = p.sum(axis=1, keepdims=True)
    rest = np.maximum(0.0, 1.0 - listed) if k < num_classes else np.zeros_like(listed)
    out = np.repeat(rest / max(num_classes - k, 1), num_classes, axis=1)
    np.put_along_axis(out, indices.astype(np.int64), p, axis=1)
    return (out / (listed + rest)).astype(np.float32)


def compress(table: LabelTable) -> bytes:
    """One zstd frame (level 19, content size in the header) of the payload."""
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True)
    return cctx.compress(table.payload())


def decompress(frame: bytes, encoding: LabelEncoding, rows: int, num_classes: int, *,
               max_bytes: int = MAX_LABEL_TABLE) -> LabelTable:
    """Check, decompress and validate a label member; raise D3MFormatError.

    Memory: the decoded table (the payload, ``max_bytes`` at most) plus a few
    MiB of scratch; nothing proportional to it is copied or widened.
    """
    where = "labels.zst"
    expected = encoding.payload_size(rows, num_classes)
    if expected > MAX_LABEL_PAYLOAD:
        raise D3MFormatError(f"{where}: payload of {expected} bytes exceeds the limit of {MAX_LABEL_PAYLOAD}")
    if expected > max_bytes:
        raise D3MFormatError(
            f"{where}: decoded label table of {expected} bytes exceeds this reader's cap of {max_bytes} bytes; "
            f"if the archive is trusted, raise it (up to {MAX_LABEL_PAYLOAD}): max_label_bytes=... for "
            "d3mfmt.load_file and D3MDataset, --max-label-bytes for d3m-inspect"
        )
    # 1. the frame header must declare exactly the size the manifest implies,
    #    checked before anything is allocated for the output
    if len(frame) < 4 or int.from_bytes(frame[:4], "little") != ZSTD_MAGIC:
        raise D3MFormatError(f"{where}: not a zstd frame (expected the magic number 28 b5 2f fd; "
                             "skippable frames are not allowed)")
    try:
        declared = zstandard.frame_content_size(frame)
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise D3MFormatError(f"{where}: not a zstd frame ({exc})") from None
    if declared != expected:
        shown = "no size" if declared < 0 else f"{declared} bytes"
        raise D3MFormatError(f"{where}: zstd frame declares {shown}, the manifest implies {expected} bytes")
    if params.dict_id:
        raise D3MFormatError(f"{where}: the zstd frame needs dictionary {params.dict_id}; frames must not use a dictionary")
    # 2. decode into one buffer of exactly the declared size; nothing may follow the frame
    try:
        payload = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        if "unused data" in str(exc):
            raise D3MFormatError(f"{where}: expected exactly one complete zstd frame of {expected} bytes, "
                                 "found bytes after it") from None
        raise D3MFormatError(f"{where}: corrupt zstd frame ({exc})") from None
    if len(payload) != expected:
        raise D3MFormatError(f"{where}: expected exactly one complete zstd frame of {expected} bytes")
    # 3. split the payload and check every entry
    return _parse_payload(payload, encoding, rows, num_classes)


def _parse_payload(payload: bytes, encoding: LabelEncoding, rows: int, num_classes: int) -> LabelTable:
    """Payload bytes -> LabelTable of views into them, checking indices and values."""
    indices = values = None
    offset = 0
    if encoding.kind != "dense":
        idx_dtype = INDEX_DTYPES[encoding.index_dtype(num_classes)]
        shape = (rows,) if encoding.kind == "hard" else (rows, encoding.k)
        indices = np.frombuffer(payload, dtype=idx_dtype, count=int(np.prod(shape)), offset=0).reshape(shape)
        offset = indices.nbytes
    if encoding.values is not None:
        width = num_classes if encoding.kind == "dense" else encoding.k
        values = np.frombuffer(payload, dtype=VALUE_CODECS[encoding.values], count=rows * width, offset=offset)
        values = values.reshape(rows, width)
    table = LabelTable(encoding, num_classes, indices, values)
    check_rows(table)
    return table


def _check_layout(table: LabelTable, where: str) -> None:
    """The arrays' dtypes and shapes are the ones the encoding stores (a hand-made table may differ)."""
    enc, rows = table.encoding, table.rows
    want_idx = None if enc.kind == "dense" else (INDEX_DTYPES[enc.index_dtype(table.num_classes)],
                                                (rows,) if enc.kind == "hard" else (rows, enc.k))
    want_val = None if enc.values is None else (VALUE_CODECS[enc.values],
                                                (rows, table.num_classes if enc.kind == "dense" else enc.k))
    for name, array, want in (("indices", table.indices, want_idx), ("values", table.values, want_val)):
        got = None if array is None else (getattr(array, "dtype", None), getattr(array, "shape", None))
        if got != want:
            shown = "none" if want is None else f"{want[0]} {want[1]}"
            raise D3MFormatError(f"{where}: {name} must be {shown} for {enc}, got {got}")


def check_rows(table: LabelTable, where: str = "labels.zst") -> None:
    """The per-row rules of SPEC.md "Label encoding", a chunk of rows at a time; raise D3MFormatError.

    The reader runs this on every table it decodes and the writer on every
    table it stores, so the two cannot disagree.
    """
    enc, num_classes = table.encoding, table.num_classes
    _check_layout(table, where)
    if table.indices is not None and table.indices.size and int(table.indices.max()) >= num_classes:
        raise D3MFormatError(f"{where}: class index {int(table.indices.max())} >= number of classes {num_classes}")
    width = num_classes if enc.kind == "dense" else enc.k
    needs_mass = enc.kind == "dense" or (enc.kind == "topk" and enc.k == num_classes)  # no unlisted mass to spread
    for part in _row_chunks(table.rows, width):
        if enc.kind == "topk" and enc.k > 1:
            ordered = np.sort(table.indices[part], axis=1)
            if np.any(ordered[:, 1:] == ordered[:, :-1]):
                raise D3MFormatError(f"{where}: a row lists the same class index twice")
        if table.values is None:
            continue
        v = table.values[part]
        if v.dtype.kind == "f" and not (np.all(np.isfinite(v)) and np.all(v >= 0) and np.all(v <= 1)):
            raise D3MFormatError(f"{where}: label values must be finite probabilities in [0, 1]")
        if needs_mass:
            empty = np.flatnonzero(_decode_values(enc.values, v).sum(axis=1) <= 0)
            if empty.size:
                raise D3MFormatError(f"{where}: a row has no probability mass (row {part.start + int(empty[0])})")
