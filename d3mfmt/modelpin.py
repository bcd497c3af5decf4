"""What a model pin covers: the files the pipeline loads, and one hash over them.

A Stable Diffusion snapshot holds far more than ``StableDiffusionPipeline``
reads: root single-file checkpoints, fp16 / non-EMA duplicates, pickled
``.bin`` copies, a safety checker. The pin (SPEC.md "Model identity") covers
exactly the files rendering loads, chosen the way diffusers and transformers
choose them for a local folder with ``use_safetensors=True`` and a variant:

- ``unet/``, ``vae/``: ``config.json`` and ``diffusion_pytorch_model[.V].safetensors``,
  or, when its index exists (diffusers looks for the index first),
  ``diffusion_pytorch_model.safetensors.index[.V].json`` and the shards it lists;
- ``text_encoder/``: ``config.json`` and ``model[.V].safetensors``, or (transformers
  looks for the single file first) ``model.safetensors.index[.V].json`` and its shards;
- ``tokenizer/``: those of :data:`TOKENIZER_FILES` that exist.

``model_index.json`` (checked by ``models.check_pipeline_index``) and the
scheduler config (the archive carries the scheduler it renders with) are not
pinned. The identity is the sha256 of the ``sha256sum``-style listing of the
pinned files, so the same checkpoint has the same identity whether it is a full
hub snapshot, a diffusers-files-only download or a plain copy of those files.

Per-file digests are cheap where they can be: a file of a Hugging Face cache
snapshot is a symlink to ``blobs/<sha256>`` for LFS files, and that name is its
digest (huggingface_hub names blobs by the hash the hub reports, and trusts its
cache the same way). Other files are hashed once and remembered by (path,
device, inode, size, mtime, ctime), so an edited or replaced file, even one with
its mtime set back, is hashed again.

Importing this module imports neither torch, diffusers nor huggingface_hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import D3MModelError

IDENTITY_PREFIX = "files-sha256:"
LEGACY_IDENTITY_PREFIX = "sha256:"  # the retired whole-folder rule (SPEC.md "Model identity")
# component -> (library whose loader picks the file, weight-file prefix)
WEIGHT_COMPONENTS = {
    "text_encoder": ("transformers", "model"),
    "unet": ("diffusers", "diffusion_pytorch_model"),
    "vae": ("diffusers", "diffusion_pytorch_model"),
}
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("added_tokens.json", "merges.txt", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json")
MAX_INDEX_BYTES = 16 << 20  # a sharded-weights index (SDXL-sized ones are ~100 kB)
MAX_SHARDS = 10_000
SMALL_FILE = 1 << 20  # hashed on every call, never remembered
DIGEST_CACHE_FILE = "file_sha256.json"
MAX_DIGEST_CACHE_BYTES = 4 << 20
MAX_DIGEST_ENTRIES = 4096

_VARIANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHARD = r"-\d{5}-of-\d{5}"


def check_variant(variant) -> None:
    """Raise D3MModelError unless ``variant`` is None or a weight-file variant name such as ``"fp16"``."""
    if variant is not None and (not isinstance(variant, str) or not _VARIANT.match(variant)):
        raise D3MModelError(
            f"variant must be None or a name of letters, digits, '_' and '-' (e.g. 'fp16'), got {variant!r}"[:300]
        )


@dataclass(frozen=True)
class ModelFiles:
    """The files of a model folder that rendering loads (SPEC.md "Model identity").

    Attributes:
        root: the model folder.
        variant: the weight variant the files were chosen for (given, or
            detected when only one variant exists); None for the plain files.
        files: the pinned files, relative POSIX paths, sorted.
        variants: every variant some weight component offers (for messages).
    """

    root: pathlib.Path
    variant: str | None
    files: tuple[str, ...]
    variants: tuple[str, ...] = ()

    def listing(self) -> str:
        """The ``sha256sum``-style text the identity hashes: ``"<sha256>  <path>\\n"`` per file."""
        return "".join(f"{file_sha256(self.root / rel)}  {rel}\n" for rel in self.files)

    def identity(self) -> str:
        """``"files-sha256:<hex>"``: the sha256 of :meth:`listing`."""
        return IDENTITY_PREFIX + hashlib.sha256(self.listing().encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------
# Which files: the loaders' own choice, over a listing of names
# ---------------------------------------------------------------------------

def _weight_names(prefix: str, variant: str | None) -> tuple[str, str]:
    """(single file, index file) names for one variant."""
    if variant is None:
        return f"{prefix}.safetensors", f"{prefix}.safetensors.index.json"
    return f"{prefix}.{variant}.safetensors", f"{prefix}.safetensors.index.{variant}.json"


def _variants_in(names: Iterable[str], prefix: str) -> set[str]:
    """Variants with a single file, an index or a shard among ``names``."""
    p = re.escape(prefix)
    forms = (rf"^{p}\.([A-Za-z0-9_-]+)\.safetensors$", rf"^{p}\.safetensors\.index\.([A-Za-z0-9_-]+)\.json$",
             rf"^{p}\.([A-Za-z0-9_-]+?){_SHARD}\.safetensors$")
    found = {m.group(1) for name in names for form in forms if (m := re.match(form, name))}
    return {v for v in found if not re.fullmatch(r"\d{5}-of-\d{5}", v)}


def _has_weights(names: set[str], prefix: str, variant: str | None) -> bool:
    single, index = _weight_names(prefix, variant)
    return single in names or index in names


def _resolve_variant(listing: dict[str, set[str]], variant: str | None, where: str) -> str | None:
    """The variant to load: the one asked for, or the only one when no plain weights exist."""
    missing = [c for c, (_, prefix) in WEIGHT_COMPONENTS.items() if not _has_weights(listing[c], prefix, variant)]
    if not missing:
        return variant
    offered = {c: sorted(_variants_in(listing[c], prefix)) for c, (_, prefix) in WEIGHT_COMPONENTS.items()}
    if variant is None and len(missing) == len(WEIGHT_COMPONENTS):
        common = set.intersection(*(set(v) for v in offered.values()))
        if len(common) == 1:
            return common.pop()
    shown = "; ".join(f"{c}: {', '.join(v) or 'none'}" for c, v in offered.items())
    _, prefix = WEIGHT_COMPONENTS[missing[0]]
    single, _ = _weight_names(prefix, variant)
    asked = "plain" if variant is None else f"variant {variant!r}"
    raise D3MModelError(
        f"{where}: {missing[0]}/ has no {single} (the {asked} weights; only safetensors are loaded, never a "
        f"pickled .bin); variants present: {shown}. Pass variant=NAME for one every component has "
        "(d3m-build/d3m-inspect: --variant NAME), or download the missing files"
    )


def _component_files(component: str, names: set[str], variant: str | None,
                     read_index: Callable[[str], bytes], where: str) -> list[str]:
    """The weight files one component's loader opens, in its own order of preference."""
    library, prefix = WEIGHT_COMPONENTS[component]
    single, index = _weight_names(prefix, variant)
    order = (index, single) if library == "diffusers" else (single, index)
    chosen = next(name for name in order if name in names)
    if chosen == single:
        return [single]
    shards = _index_shards(read_index(f"{component}/{index}"), f"{where}: {component}/{index}")
    absent = [s for s in shards if s not in names]
    if absent:
        raise D3MModelError(f"{where}: {component}/{index} lists {len(absent)} shard(s) that are missing, "
                            f"e.g. {absent[0]!r}; download them")
    return [index, *shards]


def _index_shards(raw: bytes, where: str) -> list[str]:
    """Shard file names of a safetensors index, checked."""
    if len(raw) > MAX_INDEX_BYTES:
        raise D3MModelError(f"{where}: {len(raw)} bytes is over the {MAX_INDEX_BYTES}-byte limit for a weight index")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise D3MModelError(f"{where} is not valid JSON") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
        raise D3MModelError(f"{where} has no 'metadata' object (diffusers and transformers read it)")
    if not isinstance(weight_map, dict) or not weight_map:
        raise D3MModelError(f"{where} has no 'weight_map' object naming the shards")
    shards = sorted(set(weight_map.values()), key=str)
    if len(shards) > MAX_SHARDS or not all(isinstance(s, str) and _FILE_NAME.match(s) for s in shards):
        raise D3MModelError(f"{where}: weight_map values must be at most {MAX_SHARDS} plain file names")
    return shards


def select_files(names: Iterable[str], variant: str | None, read_index: Callable[[str], bytes],
                 where: str) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """(variant, pinned files, variants offered) for a folder listing of relative POSIX ``names``.

    ``read_index(rel)`` returns the bytes of a weight index; the same rule serves
    a local folder and a hub listing (what ``allow_download`` fetches).
    """
    check_variant(variant)
    listing: dict[str, set[str]] = {c: set() for c in (*WEIGHT_COMPONENTS, "tokenizer")}
    for name in names:
        component, _, file = name.partition("/")
        if component in listing and file and "/" not in file:
            listing[component].add(file)
    variant = _resolve_variant(listing, variant, where)
    files = []
    for component in WEIGHT_COMPONENTS:
        if CONFIG_FILE not in listing[component]:
            raise D3MModelError(f"{where}: {component}/{CONFIG_FILE} is missing")
        files += [f"{component}/{name}" for name in
                  (CONFIG_FILE, *_component_files(component, listing[component], variant, read_index, where))]
    tokenizer = [name for name in TOKENIZER_FILES if name in listing["tokenizer"]]
    if not ({"vocab.json", "merges.txt"} <= set(tokenizer) or "tokenizer.json" in tokenizer):
        raise D3MModelError(f"{where}: tokenizer/ needs vocab.json and merges.txt (or tokenizer.json)")
    files += [f"tokenizer/{name}" for name in tokenizer]
    offered = sorted(set().union(*(_variants_in(listing[c], p) for c, (_, p) in WEIGHT_COMPONENTS.items())))
    return variant, tuple(sorted(files)), tuple(offered)


def model_files(path: str | os.PathLike, variant: str | None = None) -> ModelFiles:
    """The pinned files of a local diffusers folder (see the module docstring).

    Args:
        path: a Stable Diffusion pipeline folder (``models.resolve_model`` gives one).
        variant: weight variant (``"fp16"``...); None loads the plain files, or
            the only variant present when the folder has no plain weights.

    Raises:
        D3MModelError: a component's config, weights or shards are missing, the
            variant is absent or ambiguous.

    Example:
        >>> from d3mfmt.models import resolve_model
        >>> model_files(resolve_model("d3m/tiny-mnist")).files[:2]
        ('text_encoder/config.json', 'text_encoder/model.safetensors')
    """
    root = pathlib.Path(path)
    if not root.is_dir():
        raise D3MModelError(f"model folder {str(root)!r} is not a directory")
    names = [f"{c}/{e.name}" for c in (*WEIGHT_COMPONENTS, "tokenizer") if (root / c).is_dir()
             for e in os.scandir(root / c) if e.is_file()]  # is_file follows symlinks (hub snapshots)
    chosen, files, offered = select_files(names, variant, lambda rel: _read_small(root / rel), f"model {str(root)!r}")
    return ModelFiles(root, chosen, files, offered)


def model_identity(path: str | os.PathLike, variant: str | None = None) -> str:
    """``"files-sha256:<hex>"`` of the files rendering loads from ``path`` (SPEC.md "Model identity").

    Example:
        >>> from d3mfmt.models import resolve_model
        >>> model_identity(resolve_model("d3m/tiny-mnist")).startswith("files-sha256:")
        True
    """
    return model_files(path, variant).identity()


def render_files(model_ref, path, wanted: str | None, may_change_variant: bool) -> ModelFiles:
    """The files to render an archive with: ``model_files(path, wanted)``.

    ``wanted`` is the variant asked for or recorded in ``model_ref``. When
    ``may_change_variant`` (allow_model_mismatch without an explicit variant)
    and the folder lacks that variant, its own default files are used instead,
    with a warning: the identity then differs and is reported as allowed.
    """
    try:
        return model_files(path, wanted)
    except D3MModelError:
        if not may_change_variant or wanted is None:
            raise
    files = model_files(path, None)
    warnings.warn(f"the archive was rendered with the {wanted!r} weights of {model_ref.id!r}, which {path} "
                  f"lacks; rendering its {files.variant or 'plain'} weights instead (allow_model_mismatch)",
                  stacklevel=3)
    return files


def check_pin(model_ref, path, files: ModelFiles, identity: str, allow_model_mismatch: bool) -> None:
    """Raise D3MModelError when ``identity`` is not ``model_ref.identity``, unless ``allow_model_mismatch``.

    The message names the rule of a legacy ``sha256:`` pin, or the other
    variants in the folder when one of them may be the pinned one.
    """
    pinned = model_ref.identity
    if pinned is None or pinned == identity or allow_model_mismatch:
        return
    fix = ("use the pinned weights, or pass RenderOptions(allow_model_mismatch=True) (d3m-inspect: "
           "--allow-model-mismatch) to render anyway and check drift with `d3m-inspect verify`")
    if pinned.startswith(LEGACY_IDENTITY_PREFIX):
        raise D3MModelError(
            f"the archive pins model {model_ref.id!r} as {pinned}, by the whole-folder rule of d3mfmt 0.1, "
            f"which this version no longer computes ({path} has {identity} by the current rule); rebuild the "
            f"archive, or pass RenderOptions(allow_model_mismatch=True) (d3m-inspect: --allow-model-mismatch) and "
            "check drift with `d3m-inspect verify`"
        )
    others = [v for v in files.variants if v != files.variant]
    hint = (f"; the folder also has the variant(s) {', '.join(others)}: the archive may pin one of them "
            "(pass RenderOptions(variant=NAME), d3m-inspect: --variant NAME)" if others else "")
    raise D3MModelError(
        f"the archive pins model {model_ref.id!r} with identity {pinned}, but the "
        f"{files.variant or 'plain'} weights of {path} have {identity}{hint}; {fix}"
    )


def _read_small(path: pathlib.Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(MAX_INDEX_BYTES + 1)


# ---------------------------------------------------------------------------
# Per-file digests: from the hub cache's blob names, else hashed once
# ---------------------------------------------------------------------------

_DIGEST_MEMO: dict[str, str] = {}


def hub_blob_digest(path: pathlib.Path) -> str | None:
    """The sha256 a Hugging Face cache names ``path``'s blob by, or None outside such a cache.

    A snapshot file ``<repo>/snapshots/<commit>/<rel>`` links to
    ``<repo>/blobs/<etag>``; the etag of an LFS file is its sha256 (64 hex
    digits), that of a small git file its git hash (40: not used).
    """
    if not path.is_symlink():
        return None
    blob = pathlib.Path(os.path.realpath(path))
    repo = blob.parent.parent
    if blob.parent.name != "blobs" or not _SHA256.match(blob.name) or not blob.is_file():
        return None
    here = pathlib.Path(os.path.realpath(path.parent))
    return blob.name if here.is_relative_to(repo / "snapshots") else None


def file_sha256(path: str | os.PathLike) -> str:
    """Lowercase hex sha256 of a file's bytes, cheap where the answer is already known."""
    path = pathlib.Path(path)
    digest = hub_blob_digest(path)
    if digest is not None:
        return digest
    real = pathlib.Path(os.path.realpath(path))
    st = os.stat(real)
    if st.st_size < SMALL_FILE:
        return _hash_file(real)
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{real}"
    if key in _DIGEST_MEMO:
        return _DIGEST_MEMO[key]
    table = _read_digest_cache()
    digest = table.get(key)
    if not (isinstance(digest, str) and _SHA256.match(digest)):
        digest = _hash_file(real)
        _write_digest_cache(key, digest)
    _DIGEST_MEMO[key] = digest
    return digest


def _hash_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_cache_path() -> pathlib.Path:
    from .files import cache_root

    return cache_root() / DIGEST_CACHE_FILE


def _read_digest_cache() -> dict:
    path = _digest_cache_path()
    try:
        if path.stat().st_size > MAX_DIGEST_CACHE_BYTES:
            return {}  # not ours, or damaged: hash again (the digest is the same)
        table = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}  # no cache yet, or unreadable: hash again (the digest is the same)
    return table if isinstance(table, dict) else {}


def _write_digest_cache(key: str, digest: str) -> None:
    path = _digest_cache_path()
    table = _read_digest_cache()
    table.pop(key, None)
    table[key] = digest
    for stale in list(table)[: max(0, len(table) - MAX_DIGEST_ENTRIES)]:
        del table[stale]  # oldest first: the table stays small
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(table, indent=0, sort_keys=False))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time; the digest is unchanged
