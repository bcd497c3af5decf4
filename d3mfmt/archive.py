"""Read and write whole archives: ``load``/``save`` on bytes, ``load_file``/``save_file`` on paths.

Example:
    >>> import d3mfmt
    >>> archive = d3mfmt.load_file("spec/vectors/topk.d3m")        # doctest: +SKIP
    >>> archive.manifest.dataset.ipc, archive.embeddings.shape        # doctest: +SKIP
    (2, (3, 1, 8))
    >>> d3mfmt.save(archive) == open("spec/vectors/topk.d3m", "rb").read()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import numpy as np
import safetensors
import safetensors.numpy

from . import container
from .errors import D3MError, D3MFormatError
from .files import write_atomic
from .labels import MAX_LABEL_TABLE, LabelTable, check_rows, compress, decompress
from .jsonfields import check_tree, loads
from .manifest import Manifest, MemberInfo
from .sources import resolve_archive

CONTENT_HASH_DOMAIN = b"d3m-content-v1\n"
MAX_SAFETENSORS_HEADER = 100 << 20
MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True, eq=False)
class Archive:
    """A decoded archive.

    Attributes:
        manifest: the typed manifest (``members`` filled in after reading).
        embeddings: float16/float32 ``[classes, n_vectors, dim]``.
        seeds: int64 ``[classes, ipc]``.
        labels: the label table, one row per patch.
        fingerprints: uint8 ``[classes, ipc, F, F]`` or None.
    """

    manifest: Manifest
    embeddings: np.ndarray
    seeds: np.ndarray
    labels: LabelTable
    fingerprints: np.ndarray | None = None

    @property
    def content_hash(self) -> str:
        """sha256 identifying the dataset content (SPEC.md "Integrity")."""
        return content_hash(self.manifest)

    def soft_label(self, c: int, i: int, j: int) -> np.ndarray:
        """Dense float32 soft label of patch ``j`` of image ``i`` of class ``c``; D3MError outside the archive."""
        ds = self.manifest.dataset
        for name, value, size in (("c", c, ds.num_classes), ("i", i, ds.ipc), ("j", j, ds.patches_per_image)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < size:
                raise D3MError(f"soft_label: {name} must be an integer in 0..{size - 1}, got {value!r}")
        row = (c * ds.ipc + i) * ds.patches_per_image + j
        return self.labels.dense(slice(row, row + 1))[0]


def content_hash(manifest: Manifest) -> str:
    """sha256 over the dataset, generator, embeddings and labels sections and the payload hashes."""
    doc = manifest.to_dict()
    core = {key: doc[key] for key in ("dataset", "generator", "embeddings", "labels", "fingerprints")}
    core["members"] = {name: doc["members"][name] for name in container.PAYLOAD_MEMBERS if name in doc["members"]}
    check_tree(core)  # an in-memory manifest may hold what JSON cannot (an unpaired surrogate, inf)
    blob = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(CONTENT_HASH_DOMAIN + blob).hexdigest()


# -- writing ------------------------------------------------------------------


def check_archive(archive: Archive) -> None:
    """Check arrays against the manifest before writing; raise D3MFormatError."""
    m = archive.manifest
    Manifest.from_json(m.to_json())  # every field rule the reader applies, so nothing unreadable is written
    expected = tensor_specs(m)
    given = {"embeddings": archive.embeddings, "seeds": archive.seeds}
    if archive.fingerprints is not None:
        given["fingerprints"] = archive.fingerprints
    if set(given) != set(expected):
        raise D3MFormatError(
            f"tensors {sorted(given)} do not match the manifest, which expects {sorted(expected)} "
            "(fingerprints present iff manifest.fingerprint_size is set)"
        )
    for name, array in given.items():
        dtype, shape = expected[name]
        if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype) or array.shape != shape:
            got = f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}"
            raise D3MFormatError(f"tensor {name!r} must be {dtype} {shape}, got {got}")
    _check_tensor_values(archive.embeddings, archive.seeds)
    t = archive.labels
    if t.encoding != m.labels or t.num_classes != m.dataset.num_classes or t.rows != m.dataset.num_patches:
        raise D3MFormatError(
            f"label table ({t.encoding}, {t.rows} rows x {t.num_classes} classes) does not match the manifest "
            f"({m.labels}, {m.dataset.num_patches} rows x {m.dataset.num_classes} classes)"
        )
    check_rows(t, where="labels")  # the reader's per-row rules, for tables not made by encode_labels


def save(archive: Archive) -> bytes:
    """Serialise ``archive`` to .d3m bytes; identical inputs give identical bytes."""
    check_archive(archive)
    tensors = {"embeddings": archive.embeddings, "seeds": archive.seeds}
    if archive.fingerprints is not None:
        tensors["fingerprints"] = archive.fingerprints
    payload = {
        container.TENSORS: safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}),
        container.LABELS: compress(archive.labels),
    }
    members = {name: MemberInfo(size=len(b), sha256=hashlib.sha256(b).hexdigest()) for name, b in payload.items()}
    manifest = archive.manifest.with_members(members)
    return container.write_zip(
        {
            container.MIMETYPE: container.MEDIA_TYPE,
            container.MANIFEST: manifest.to_json(),
            container.TENSORS: payload[container.TENSORS],
            container.LABELS: payload[container.LABELS],
        }
    )


def save_file(archive: Archive, path: str | os.PathLike) -> None:
    """Write ``archive`` to ``path`` atomically (temporary file, then rename)."""
    write_atomic(path, save(archive))


# -- reading ------------------------------------------------------------------


def load(data: bytes, *, max_label_bytes: int = MAX_LABEL_TABLE) -> Archive:
    """Parse and fully validate .d3m bytes; raise D3MFormatError naming the problem.

    ``max_label_bytes`` caps the decoded label table (SPEC.md "Limits"); raise
    it, up to the format's 2 GiB, to read a genuinely huge trusted archive.
    """
    return load_members(container.read_zip(data), max_label_bytes=max_label_bytes)


def load_members(members: dict[str, bytes], *, max_label_bytes: int = MAX_LABEL_TABLE) -> Archive:
    """Validate and decode the members ``container.read_zip`` returned."""
    manifest = Manifest.from_json(members[container.MANIFEST])
    for name in container.PAYLOAD_MEMBERS:
        check_member(manifest, name, members[name])
    tensors = parse_tensors(manifest, members[container.TENSORS])
    ds = manifest.dataset
    labels = decompress(members[container.LABELS], manifest.labels, ds.num_patches, ds.num_classes, max_bytes=max_label_bytes)
    return Archive(manifest, tensors["embeddings"], tensors["seeds"], labels, tensors.get("fingerprints"))


def load_file(
    path: str | os.PathLike,
    *,
    allow_download: bool = False,
    sha256: str | None = None,
    allow_unpinned: bool = False,
    max_label_bytes: int = MAX_LABEL_TABLE,
) -> Archive:
    """Read ``path`` once (no handle stays open) and ``load`` it.

    ``path`` may also be an ``hf://datasets/ORG/NAME[@REV]/FILE.d3m`` id or a URL
    pinned by ``#sha256=<hex>``; :func:`d3mfmt.sources.resolve_archive` turns it
    into a local file first (offline unless ``allow_download=True``).
    ``max_label_bytes`` caps the decoded label table (raise it for genuinely huge archives).
    """
    local = resolve_archive(path, allow_download=allow_download, sha256=sha256, allow_unpinned=allow_unpinned)
    return load(container.read_bytes(local), max_label_bytes=max_label_bytes)


def check_member(manifest: Manifest, name: str, data: bytes) -> None:
    """Size and sha256 of a payload member against the manifest."""
    info = manifest.members.get(name)
    if info is None:
        raise D3MFormatError(f"manifest.json: members.{name} is missing")
    if len(data) != info.size:
        raise D3MFormatError(f"{name}: {len(data)} bytes, the manifest says {info.size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise D3MFormatError(f"{name}: sha256 {digest} does not match the manifest's {info.sha256}")


def tensor_specs(manifest: Manifest) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (numpy dtype name, shape) that tensors.safetensors must hold."""
    ds, emb = manifest.dataset, manifest.embeddings
    specs = {
        "embeddings": (emb.dtype, (ds.num_classes, emb.n_vectors, emb.dim)),
        "seeds": ("int64", (ds.num_classes, ds.ipc)),
    }
    if manifest.fingerprint_size is not None:
        f = manifest.fingerprint_size
        specs["fingerprints"] = ("uint8", (ds.num_classes, ds.ipc, f, f))
    return specs


_ST_DTYPES = {"float16": "F16", "float32": "F32", "int64": "I64", "uint8": "U8"}


def parse_tensors(manifest: Manifest, data: bytes) -> dict[str, np.ndarray]:
    """Check the safetensors header against the manifest, then load from bytes."""
    where = container.TENSORS
    # 1. header: bounded length, exact tensor set, dtypes and shapes as the manifest says
    if len(data) < 8:
        raise D3MFormatError(f"{where}: truncated (no header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_SAFETENSORS_HEADER, len(data) - 8):
        raise D3MFormatError(f"{where}: header length {header_len} exceeds the member's {len(data) - 8} bytes")
    try:  # duplicate keys refused: another reader could take the other one
        header = loads(data[8 : 8 + header_len], where=f"{where}: header")
        check_tree(header, where=f"{where}: header")
    except D3MFormatError as exc:
        raise D3MFormatError(f"{where}: header is not valid JSON ({exc})"[:500]) from None
    if not isinstance(header, dict):
        raise D3MFormatError(f"{where}: header must be a JSON object")
    header.pop("__metadata__", None)
    specs = tensor_specs(manifest)
    if set(header) != set(specs):
        raise D3MFormatError(f"{where}: holds tensors {sorted(header)}, the manifest implies {sorted(specs)}")
    for name, (dtype, shape) in specs.items():
        entry = header[name]
        got = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else (None, None)
        if got != (_ST_DTYPES[dtype], list(shape)):
            raise D3MFormatError(f"{where}: tensor {name!r} is {got[0]} {got[1]}, the manifest implies {dtype} {list(shape)}")
    # 2. payload: offsets and coverage are checked by safetensors itself
    try:
        tensors = safetensors.numpy.load(bytes(data))
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise D3MFormatError(f"{where}: invalid safetensors data ({exc})") from None
    for name, (dtype, shape) in specs.items():  # what was loaded is what the header said
        if tensors[name].dtype != np.dtype(dtype) or tensors[name].shape != shape:
            raise D3MFormatError(f"{where}: tensor {name!r} loaded as {tensors[name].dtype} {tensors[name].shape}")
    _check_tensor_values(tensors["embeddings"], tensors["seeds"])
    return tensors


def _check_tensor_values(embeddings: np.ndarray, seeds: np.ndarray) -> None:
    if not np.all(np.isfinite(embeddings)):
        raise D3MFormatError(f"{container.TENSORS}: embeddings contain NaN or Inf")
    if seeds.size and int(seeds.min()) < 0:
        raise D3MFormatError(f"{container.TENSORS}: seeds must be in 0..{MAX_SEED}, got {int(seeds.min())}")
