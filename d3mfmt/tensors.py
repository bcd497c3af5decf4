"""The ``tensors.safetensors`` member: its expected layout, and a bounded, copy-once reader.

SPEC.md ("Tensors") is the authority. The reader refuses a header from its
8-byte declared length alone when that exceeds ``MAX_SAFETENSORS_HEADER``
(64 KiB: three tensor entries take a few hundred bytes), so a hostile 100 MiB
header is never read, let alone parsed. It then checks the header against the
manifest and applies safetensors' own rules (contiguous data offsets from 0
covering the buffer exactly) before copying each tensor out of the member once;
no copy of the whole member is made. Writing goes through ``safetensors.numpy``.
"""

from __future__ import annotations

import struct

import numpy as np

from .errors import D3MFormatError
from .jsonfields import check_tree, loads, show

WHERE = "tensors.safetensors"
MAX_SAFETENSORS_HEADER = 64 << 10  # bytes of JSON header; checked from the declared length before parsing
MAX_METADATA_ENTRIES = 64
MAX_SEED = (1 << 63) - 1
CHECK_CHUNK = 1 << 18  # elements checked for finiteness at a time
DTYPES = {"float16": ("F16", "<f2"), "float32": ("F32", "<f4"), "int64": ("I64", "<i8"), "uint8": ("U8", "u1")}
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def tensor_specs(manifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (numpy dtype name, shape) that tensors.safetensors must hold for ``manifest``."""
    ds, emb = manifest.dataset, manifest.embeddings
    specs = {
        "embeddings": (emb.dtype, (ds.num_classes, emb.n_vectors, emb.dim)),
        "seeds": ("int64", (ds.num_classes, ds.ipc)),
    }
    if manifest.fingerprint_size is not None:
        f = manifest.fingerprint_size
        specs["fingerprints"] = ("uint8", (ds.num_classes, ds.ipc, f, f))
    return specs


def parse_tensors(manifest, data) -> dict[str, np.ndarray]:
    """Check the safetensors member against ``manifest`` and return its tensors; raise D3MFormatError."""
    specs = tensor_specs(manifest)
    header, body = _read_header(data)
    # 1. exactly the tensors the manifest implies, with its dtypes and shapes
    if set(header) != set(specs):
        raise D3MFormatError(f"{WHERE}: holds tensors {sorted(header)[:8]}, the manifest implies {sorted(specs)}"[:500])
    for name, (dtype, shape) in specs.items():
        entry = header[name]
        got = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else (None, None)
        if got != (DTYPES[dtype][0], list(shape)):
            raise D3MFormatError(f"{WHERE}: tensor {name!r} is {got[0]} {got[1]}, the manifest implies "
                                 f"{dtype} {list(shape)}"[:500])
        if set(entry) != ENTRY_KEYS:
            raise D3MFormatError(f"{WHERE}: tensor {name!r} must have exactly the keys {sorted(ENTRY_KEYS)}, "
                                 f"got {sorted(entry)[:8]}"[:500])
    # 2. safetensors' rule: data offsets back to back from 0, covering the buffer exactly
    spans = sorted((_offsets(name, header[name]["data_offsets"]), name) for name in specs)
    end = 0
    for (begin, stop), name in spans:
        dtype, shape = specs[name]
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][1]).itemsize
        if begin != end or stop - begin != size:
            raise D3MFormatError(f"{WHERE}: tensor {name!r} has data offsets [{begin}, {stop}], expected "
                                 f"[{end}, {end + size}] (tensors back to back, {size} bytes for {dtype} {list(shape)})")
        end = stop
    if end != len(body):
        raise D3MFormatError(f"{WHERE}: tensors cover {end} bytes of a {len(body)}-byte data buffer; "
                             "safetensors requires it covered exactly")
    # 3. one copy per tensor, straight from the member's bytes
    tensors = {}
    for (begin, stop), name in spans:
        dtype, shape = specs[name]
        view = np.frombuffer(body, dtype=DTYPES[dtype][1], count=(stop - begin) // np.dtype(DTYPES[dtype][1]).itemsize,
                             offset=begin)
        tensors[name] = view.astype(np.dtype(dtype), copy=True).reshape(shape)
    check_tensor_values(tensors["embeddings"], tensors["seeds"])
    return tensors


def _read_header(data) -> tuple[dict, memoryview]:
    """(tensor entries without ``__metadata__``, data buffer) after the bounded header checks."""
    if len(data) < 8:
        raise D3MFormatError(f"{WHERE}: truncated (no header length)")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > MAX_SAFETENSORS_HEADER:
        raise D3MFormatError(f"{WHERE}: header length {header_len:,} bytes exceeds the limit of "
                             f"{MAX_SAFETENSORS_HEADER:,} (its three tensor entries need a few hundred); refused unread")
    if header_len > len(data) - 8:
        raise D3MFormatError(f"{WHERE}: header length {header_len} exceeds the member's {len(data) - 8} bytes")
    view = memoryview(data)
    try:  # duplicate keys refused: another reader could take the other one
        header = loads(view[8 : 8 + header_len], where=f"{WHERE}: header")
        check_tree(header, where=f"{WHERE}: header")
    except D3MFormatError as exc:
        raise D3MFormatError(f"{WHERE}: header is not valid JSON ({exc})"[:500]) from None
    if not isinstance(header, dict):
        raise D3MFormatError(f"{WHERE}: header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None:  # safetensors: a string -> string map
        ok = isinstance(metadata, dict) and len(metadata) <= MAX_METADATA_ENTRIES
        if not (ok and all(isinstance(v, str) for v in metadata.values())):
            raise D3MFormatError(f"{WHERE}: __metadata__ must be an object of at most {MAX_METADATA_ENTRIES} "
                                 f"string values, got {show(metadata)}"[:500])
    return header, view[8 + header_len :]


def _offsets(name: str, value) -> tuple[int, int]:
    ok = isinstance(value, list) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v for v in value) and value[0] <= value[1]
    if not ok:
        raise D3MFormatError(f"{WHERE}: tensor {name!r} data_offsets must be [begin, end] with 0 <= begin <= end, "
                             f"got {show(value)}"[:500])
    return value[0], value[1]


def check_tensor_values(embeddings: np.ndarray, seeds: np.ndarray) -> None:
    """Finite embeddings and non-negative seeds (SPEC.md "Tensors"); raise D3MFormatError."""
    flat = embeddings.reshape(-1)
    for start in range(0, flat.size, CHECK_CHUNK):  # no full-size boolean temporary
        if not np.isfinite(flat[start : start + CHECK_CHUNK]).all():
            raise D3MFormatError(f"{WHERE}: embeddings contain NaN or Inf")
    if seeds.size and int(seeds.min()) < 0:
        raise D3MFormatError(f"{WHERE}: seeds must be in 0..{MAX_SEED}, got {int(seeds.min())}")
