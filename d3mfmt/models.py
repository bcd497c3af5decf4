"""Model resolution: turn a model id into a local diffusers folder, and pin it.

A model id is one of, checked in this order:

1. a built-in id (``"d3m/tiny-mnist"``): a key of :data:`BUILTIN_MODELS`, shipped
   inside this package. The ``d3m/`` namespace is reserved for built-ins;
2. an existing directory: used as-is;
3. an existing file: a single-file checkpoint (``*.safetensors``, ``*.ckpt``),
   refused with the one command that converts it;
4. a Hugging Face hub id ``org/name`` (optionally with a ``revision``): looked up
   in the local Hugging Face cache only; downloaded only with
   ``allow_download=True`` (and never while ``HF_HUB_OFFLINE`` is set), and then
   only the files the pin covers.

Every folder must hold a ``model_index.json`` naming a ``StableDiffusionPipeline``
with the SD 1.x/2.x components (:func:`check_pipeline_index`): SDXL and other
pipelines are refused here, before any work. :func:`model_identity` (from
``d3mfmt.modelpin``) is the value an archive records so that a consumer can tell
it has the same weights; it covers only the files rendering loads.

Importing this module imports neither torch, diffusers nor huggingface_hub.

Example:
    >>> path = resolve_model("d3m/tiny-mnist")
    >>> (path / "model_index.json").is_file()
    True
    >>> from d3mfmt.modelpin import model_identity
    >>> model_identity(path)[:13]
    'files-sha256:'
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex

from d3mfmt.errors import D3MModelError
from d3mfmt.modelpin import MAX_INDEX_BYTES as MAX_WEIGHT_INDEX_BYTES
from d3mfmt.modelpin import check_variant, model_files, select_files

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
BUILTIN_NAMESPACE = "d3m/"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MAX_REVISION_CHARS = 256
MAX_INDEX_JSON_BYTES = 1 << 20
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SUPPORTED = "StableDiffusionPipeline checkpoints (SD 1.x, SD 2.x, SD 2.x-base)"
# model_index.json entries the renderer loads: component -> accepted [library, class] pairs
PIPELINE_COMPONENTS = {
    "unet": (("diffusers", "UNet2DConditionModel"),),
    "vae": (("diffusers", "AutoencoderKL"),),
    "text_encoder": (("transformers", "CLIPTextModel"),),
    "tokenizer": (("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")),
}
# what a download adds to the pinned files: the pipeline index, and the scheduler the builder reads
DOWNLOAD_EXTRAS = ("model_index.json", "scheduler/scheduler_config.json")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside d3mfmt, with the generation settings it was tuned for."""

    folder: str  # under d3mfmt/weights/
    resolution: int  # single image, pixels
    collage_resolution: int  # 2x2 collage, pixels
    steps: int  # DDIM steps (eta 0)
    guidance_scale: float
    photo_template: str
    collage_template: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "d3m/tiny-mnist": BuiltinModel(
        folder="tiny-mnist",
        resolution=32,
        collage_resolution=64,
        steps=20,
        guidance_scale=4.0,
        photo_template="a photo of handwritten digit {}",  # the training captions, class word at {}
        collage_template="a collage of handwritten digit {}",
    ),
}



# ---------------------------------------------------------------------------
# Checks: hub ids, revisions, the pipeline index, single files
# ---------------------------------------------------------------------------

def check_hub_id(model_id: str, what: str = "model") -> None:
    """Raise D3MModelError unless ``model_id`` is a valid hub id ``org/name`` (huggingface_hub's own rules).

    ``what`` names the kind of repository in the message (``"model"``, ``"dataset"``).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    shown = repr(model_id)[:200]
    if not _HUB_ID.match(model_id):
        raise D3MModelError(f"{what} {shown} is not a Hugging Face hub id of the form 'org/name'")
    try:
        validate_repo_id(model_id)
    except HFValidationError as err:
        rule = str(err).split(":")[0]
        raise D3MModelError(f"{what} {shown} is not a valid Hugging Face hub id ({rule}); "
                            "ids are 'org/name', at most 96 characters of letters, digits, '-', '_' and '.', "
                            "without '--' or '..'") from None


def check_revision(revision) -> None:
    """Raise D3MModelError unless ``revision`` is None or a branch, tag or commit name."""
    if revision is None:
        return
    ok = isinstance(revision, str) and len(revision) <= MAX_REVISION_CHARS and bool(_REVISION.match(revision))
    if not ok or ".." in str(revision):
        raise D3MModelError(
            f"revision must be a branch, tag or commit hash (letters, digits, '_', '.', '+', '-', '/'; "
            f"no '..'), got {revision!r}"[:300]
        )


def check_pipeline_index(path: pathlib.Path, where: str) -> None:
    """Refuse, before any work, a folder that is not a Stable Diffusion 1.x/2.x pipeline.

    Reads ``model_index.json``: its ``_class_name`` must be ``StableDiffusionPipeline``
    and it must name the components of :data:`PIPELINE_COMPONENTS`; SDXL (two
    text encoders) and every other pipeline are refused with what is supported.
    """
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise D3MModelError(f"{where} has no model_index.json; expected a diffusers pipeline folder "
                            "(e.g. one written by `pipe.save_pretrained(...)`)")
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read(MAX_INDEX_JSON_BYTES + 1))
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        raise D3MModelError(f"{where}: model_index.json is not a JSON object of at most {MAX_INDEX_JSON_BYTES} bytes")
    name = index.get("_class_name")
    if name == "StableDiffusionXLPipeline" or any(index.get(c) not in (None, [None, None]) for c in SDXL_COMPONENTS):
        raise D3MModelError(f"{where} is an SDXL pipeline ({name!r}, two text encoders), which d3mfmt does not "
                            f"render; it supports {SUPPORTED}")
    if name != "StableDiffusionPipeline":
        raise D3MModelError(f"{where} is a {str(name)[:100]!r} pipeline, which d3mfmt does not render; "
                            f"it supports {SUPPORTED}")
    for component, accepted in PIPELINE_COMPONENTS.items():
        entry = index.get(component)
        if not (isinstance(entry, list) and tuple(entry) in accepted):
            wanted = " or ".join(str(list(a)) for a in accepted)
            raise D3MModelError(f"{where}: model_index.json names {component} {str(entry)[:100]}, expected {wanted}; "
                                f"d3mfmt supports {SUPPORTED}")


def _refuse_single_file(path: pathlib.Path) -> None:
    """A model id that names a file: say how to make a diffusers folder from it."""
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise D3MModelError(f"model {str(path)!r} is a file, not a diffusers pipeline folder")
    out = str(path.with_name(path.stem + "-diffusers"))
    code = (f"from diffusers import StableDiffusionPipeline as P; "
            f"P.from_single_file({str(path)!r}).save_pretrained({out!r})")
    raise D3MModelError(
        f"model {str(path)!r} is a single-file checkpoint; d3mfmt loads diffusers folders. Convert it once with "
        f"`python -c {shlex.quote(code)}` (it fetches the matching diffusers configs unless they are cached; "
        f"offline, add config=DIFFUSERS_FOLDER of the same model family) and pass model={out!r}"
    )


def download_command(model_id: str, revision: str | None, files=None) -> str:
    """The shell command that fetches ``model_id`` (only ``files``, when given) into the Hugging Face cache."""
    parts = ["hf", "download", model_id] + (["--revision", revision] if revision else []) + list(files or [])
    return " ".join(shlex.quote(part) for part in parts)


# ---------------------------------------------------------------------------
# The Hugging Face cache, read by its documented layout, and downloads
# ---------------------------------------------------------------------------

def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached_snapshot(model_id: str, revision: str | None) -> pathlib.Path | None:
    """``<cache>/models--org--name/snapshots/<commit>`` for a revision, or None when it is not cached."""
    repo = pathlib.Path(_hf_cache_dir()) / ("models--" + model_id.replace("/", "--"))
    rev = revision or "main"
    commit = rev if _COMMIT.match(rev) and (repo / "snapshots" / rev).is_dir() else None
    ref = repo / "refs" / rev
    if commit is None and ref.is_file():
        with open(ref, "rb") as f:
            text = f.read(64).decode("ascii", "replace").strip()
        commit = text if _COMMIT.match(text) else None
    snapshot = repo / "snapshots" / commit if commit else None
    return snapshot if snapshot is not None and snapshot.is_dir() else None


def _download_pinned(model_id: str, revision: str | None, variant: str | None) -> pathlib.Path:
    """Fetch exactly the pinned files (plus :data:`DOWNLOAD_EXTRAS`) of a hub model; return its snapshot."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    names = set(HfApi().list_repo_files(model_id, revision=revision))
    where = f"model {model_id!r}" + (f" at revision {revision!r}" if revision else "")
    missing = [n for n in DOWNLOAD_EXTRAS[:1] if n not in names]
    if missing:
        raise D3MModelError(f"{where} has no model_index.json; expected a diffusers pipeline repository")
    snapshot = pathlib.Path(snapshot_download(model_id, revision=revision, allow_patterns=["model_index.json"]))
    check_pipeline_index(snapshot, where)

    def read_index(rel: str) -> bytes:
        with open(hf_hub_download(model_id, rel, revision=revision), "rb") as f:
            return f.read(MAX_WEIGHT_INDEX_BYTES + 1)  # select_files refuses anything longer

    _, files, _ = select_files(names, variant, read_index, where)
    wanted = [*files, *(n for n in DOWNLOAD_EXTRAS if n in names)]
    return pathlib.Path(snapshot_download(model_id, revision=revision, allow_patterns=wanted))


def _hub_snapshot(model_id: str, revision: str | None, allow_download: bool, variant: str | None) -> pathlib.Path:
    """Find (or, if allowed, fetch) a hub model in the local Hugging Face cache."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    at = f" at revision {revision!r}" if revision else ""
    snapshot = _cached_snapshot(model_id, revision)
    if snapshot is not None:
        check_pipeline_index(snapshot, f"model {model_id!r}{at} ({snapshot})")
        try:
            model_files(snapshot, variant)  # every pinned file is there (nothing is hashed yet)
            return snapshot
        except D3MModelError as err:
            if not allow_download or constants.HF_HUB_OFFLINE:
                raise D3MModelError(f"{err}; the cached snapshot is incomplete: {_fetch_hint(model_id, revision)}"
                                    ) from None
    elif not allow_download or constants.HF_HUB_OFFLINE:
        how = (
            "HF_HUB_OFFLINE is set, so nothing is downloaded; unset it and pass allow_download=True"
            if allow_download else
            _fetch_hint(model_id, revision)
        )
        raise D3MModelError(
            f"model {model_id!r}{at} is not in the local Hugging Face cache ({_hf_cache_dir()}); {how}, "
            "or pass a directory path"
        )
    try:
        return _download_pinned(model_id, revision, variant)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, *_http_errors()) as err:
        raise D3MModelError(f"model {model_id!r}{at}: download failed: {str(err)[:300]}") from None


def _fetch_hint(model_id: str, revision: str | None) -> str:
    """How to get a hub model into the cache, for each tool (d3m-build has no download switch)."""
    return (f"download it once with `{download_command(model_id, revision)}` (d3m-build: run the command first), "
            "or let d3mfmt fetch only the files the pin covers: allow_download=True in Python "
            "(RenderOptions(allow_download=True) for D3MDataset), d3m-inspect: --allow-download")


def _http_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' own connection errors (httpx's are not OSErrors), where installed."""
    found = []
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def resolve_model(model_id: str, revision: str | None = None, *, allow_download: bool = False,
                  variant: str | None = None) -> pathlib.Path:
    """Resolve a model id to a local Stable Diffusion pipeline folder.

    Args:
        model_id: a built-in id (``"d3m/tiny-mnist"``), a directory, or a hub id
            ``"org/name"``.
        revision: hub branch, tag or commit (hub ids only).
        allow_download: fetch a hub model that is not cached yet (off by
            default; ignored, with an error, while ``HF_HUB_OFFLINE`` is set).
            Only the files :func:`model_files` pins for ``variant`` are fetched,
            with ``model_index.json`` and the scheduler config.
        variant: the weight variant to fetch (``"fp16"``...); it matters here
            only for downloads (pass it to :func:`model_files` as well).

    Returns:
        The absolute path of the folder (it holds ``model_index.json``).

    Raises:
        D3MModelError: unknown built-in, missing directory, a single-file
            checkpoint, an SDXL or other unsupported pipeline, an invalid hub id
            or revision, a model that is not cached.

    Example:
        >>> resolve_model("d3m/tiny-mnist").name
        'tiny-mnist'
    """
    if not isinstance(model_id, str) or not model_id:
        raise D3MModelError(f"model id must be a non-empty string, got {model_id!r}")
    check_variant(variant)
    if model_id.startswith(BUILTIN_NAMESPACE):
        return _builtin_folder(model_id, revision)
    path = pathlib.Path(model_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise D3MModelError(
                f"model directory {model_id!r} has no revisions (got revision={revision!r}); pass revision=None"
            )
        check_pipeline_index(path, f"model directory {str(path)!r}")
        return path.resolve()
    if path.is_file():
        _refuse_single_file(path)
    if "/" not in model_id or model_id.startswith((".", "~", "/")) or model_id.count("/") > 1:
        raise D3MModelError(
            f"model {model_id[:200]!r} is not a built-in model ({sorted(BUILTIN_MODELS)}), not an existing "
            "directory, and not a Hugging Face hub id of the form 'org/name'; check the path"
        )
    check_hub_id(model_id)
    check_revision(revision)
    return _hub_snapshot(model_id, revision, allow_download, variant)


def _builtin_folder(model_id: str, revision: str | None) -> pathlib.Path:
    if model_id not in BUILTIN_MODELS:
        raise D3MModelError(
            f"unknown built-in model {model_id!r}; known built-in models: {sorted(BUILTIN_MODELS)}"
        )
    if revision is not None:
        raise D3MModelError(
            f"built-in model {model_id!r} has no revisions (got revision={revision!r}); "
            "pass revision=None, its identity is model_identity(path)"
        )
    path = WEIGHTS_DIR / BUILTIN_MODELS[model_id].folder
    if not (path / "model_index.json").is_file():
        raise D3MModelError(
            f"built-in model {model_id!r}: {path} is missing or incomplete; reinstall d3mfmt "
            "or retrain it with `python examples/train_builtin_models.py`"
        )
    return path

