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
from dataclasses import dataclass

import numpy as np
import safetensors.numpy

from . import container
from .downloads import DownloadLimits
from .errors import D3MError, D3MFormatError
from .files import write_atomic
from .jsonfields import check_tree
from .labels import MAX_LABEL_TABLE, LabelTable, check_rows, compress, decompress
from .manifest import Manifest, MemberInfo
from .renderable import RenderLimits, check_render_cost
from .sources import resolve_archive
from .tensors import check_tensor_values, parse_tensors, tensor_specs

CONTENT_HASH_DOMAIN = b"d3m-content-v1\n"


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
        """sha256 identifying the dataset content (SPEC.md "Integrity"): the same before ``save`` and after ``load``.

        A loaded archive's manifest lists its payload members; one made in code
        (no ``members`` yet) gets them from its arrays, as ``save`` would write them.
        After replacing arrays of a loaded archive, drop its members
        (``manifest.with_members({})``) so the hash follows the new arrays.
        """
        manifest = self.manifest
        if any(name not in manifest.members for name in container.PAYLOAD_MEMBERS):
            manifest = manifest.with_members(_member_infos(payload_members(self)))
        return content_hash(manifest)

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
    check_tensor_values(archive.embeddings, archive.seeds)
    t = archive.labels
    if t.encoding != m.labels or t.num_classes != m.dataset.num_classes or t.rows != m.dataset.num_patches:
        raise D3MFormatError(
            f"label table ({t.encoding}, {t.rows} rows x {t.num_classes} classes) does not match the manifest "
            f"({m.labels}, {m.dataset.num_patches} rows x {m.dataset.num_classes} classes)"
        )
    check_rows(t, where="labels")  # the reader's per-row rules, for tables not made by encode_labels


def payload_members(archive: Archive) -> dict[str, bytes]:
    """The bytes of ``tensors.safetensors`` and ``labels.zst`` for ``archive`` (deterministic)."""
    tensors = {"embeddings": archive.embeddings, "seeds": archive.seeds}
    if archive.fingerprints is not None:
        tensors["fingerprints"] = archive.fingerprints
    return {
        container.TENSORS: safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}),
        container.LABELS: compress(archive.labels),
    }


def _member_infos(payload: dict[str, bytes]) -> dict[str, MemberInfo]:
    return {name: MemberInfo(size=len(b), sha256=hashlib.sha256(b).hexdigest()) for name, b in payload.items()}


def save(archive: Archive) -> bytes:
    """Serialise ``archive`` to .d3m bytes; identical inputs give identical bytes."""
    check_archive(archive)
    payload = payload_members(archive)
    manifest = archive.manifest.with_members(_member_infos(payload))
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


def load(data: bytes, *, max_label_bytes: int = MAX_LABEL_TABLE, render_limits: RenderLimits | None = None) -> Archive:
    """Parse and fully validate .d3m bytes; raise D3MFormatError naming the problem.

    ``max_label_bytes`` caps the decoded label table (SPEC.md "Limits"); raise
    it, up to the format's 2 GiB, to read a genuinely huge trusted archive.
    ``render_limits`` bounds what rendering may cost (SPEC.md "Render cost");
    None applies the defaults (a built-in model's own); pass e.g.
    ``RenderLimits(per_image=None, total=None)`` for a trusted, costly archive.
    """
    return load_members(container.read_zip(data), max_label_bytes=max_label_bytes, render_limits=render_limits)


def load_members(members: dict[str, bytes], *, max_label_bytes: int = MAX_LABEL_TABLE,
                 render_limits: RenderLimits | None = None) -> Archive:
    """Validate and decode the members ``container.read_zip`` returned (keywords as ``load``)."""
    manifest = Manifest.from_json(members[container.MANIFEST])
    check_render_cost(manifest, render_limits)
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
    render_limits: RenderLimits | None = None,
    download_limits: DownloadLimits | None = None,
) -> Archive:
    """Read ``path`` once (no handle stays open) and ``load`` it.

    ``path`` may also be an ``hf://datasets/ORG/NAME[@REV]/FILE.d3m`` id or a URL
    pinned by ``#sha256=<hex>``; :func:`d3mfmt.sources.resolve_archive` turns it
    into a local file first (offline unless ``allow_download=True``; a URL's
    transfer bounded by ``download_limits``, default ``DownloadLimits()``).
    ``max_label_bytes`` and ``render_limits`` as for ``load``.
    """
    local = resolve_archive(path, allow_download=allow_download, sha256=sha256, allow_unpinned=allow_unpinned,
                            download_limits=download_limits)
    return load(container.read_bytes(local), max_label_bytes=max_label_bytes, render_limits=render_limits)


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
