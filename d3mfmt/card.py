"""A Hugging Face dataset card for an archive, generated from its manifest.

:func:`write_card` writes a folder ready for ``huggingface-cli upload``: the
archive, ``preview.png`` (the preview grid of ``d3m-inspect preview``) and
``README.md`` with the Hub's YAML front matter and a body made from the
manifest. Every manifest string is untrusted: front-matter values go through a
YAML dumper, body text through :func:`md_escape`, code through :func:`md_code`.
:func:`card_text` alone needs no torch.

Example:
    >>> write_card("mnist_ipc10.d3m", "card/", repo_id="me/mnist-d3m")   # doctest: +SKIP
    PosixPath('card')
    >>> # then: huggingface-cli upload --repo-type dataset me/mnist-d3m card/
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from pathlib import Path

from . import container
from .archive import Archive, load_members
from .errors import D3MError
from .files import atomic_folder, check_new_folder, safe_file_name, write_atomic
from .models import BUILTIN_NAMESPACE
from .labels import MAX_LABEL_TABLE
from .render import RenderOptions
from .renderable import RenderLimits
from .summary import summarize

# Defaults (the CLI's too)
CARD_PREVIEW_CLASSES = 10  # rows of preview.png: the first classes of the archive
CARD_PREVIEW_PER_CLASS = 8
MAX_CLASS_ROWS = 1000  # rows of the class table
MAX_BUILD_ROWS = 200  # rows of the build table
MAX_BUILD_DEPTH = 6
MAX_INLINE_LIST = 12  # longer numeric lists are summarised as n / min / mean / max
MAX_VALUE_CHARS = 200
README, PREVIEW = "README.md", "preview.png"
TAGS = ["dataset-distillation", "d3m", "synthetic"]
PAPER = "https://arxiv.org/abs/2403.07142"
# Hub licence ids an archive's SPDX licence maps onto (lower-cased); others become "other"
HUB_LICENSES = frozenset(
    "apache-2.0 mit openrail openrail++ creativeml-openrail-m bigscience-openrail-m cc0-1.0 cc-by-2.0 cc-by-2.5 "
    "cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 "
    "cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 bsd-2-clause bsd-3-clause "
    "gpl-2.0 gpl-3.0 lgpl-3.0 agpl-3.0 odc-by odbl pddl cdla-permissive-2.0 cdla-sharing-1.0 afl-3.0 "
    "artistic-2.0 unlicense wtfpl llama2 llama3 gemma unknown other".split()
)
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")  # inline markup, links, HTML, table cells
# what GFM renderers (GitHub's cmark-gfm, the Hub's) link without any markup: scheme://, www., user@host.
# A backslash escape stops the first two; an e-mail address is matched after escapes are resolved, so a
# word joiner (U+2060, invisible) after its '@' breaks it instead.
_AUTOLINK = re.compile(r"(?i)(?<=[a-z0-9+.-])(:)(?=/)|(@)|(?<=\bwww)(\.)")
WORD_JOINER = "&#8288;"
_MD_LEADING = re.compile(r"^(?:([#+\-=])|(\d+)([.)]))(?=\s|$)")  # what opens a heading or list at a line start
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# -- escaping -------------------------------------------------------------------


def one_line(text, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` as one line of printable characters, at most ``limit`` long."""
    text = _CONTROL.sub(" ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md_escape(text, limit: int = MAX_VALUE_CHARS) -> str:
    """Untrusted text as inert Markdown: one line, inline markup escaped, no heading or list opened,
    no URL or e-mail address autolinked (``https\\://``, ``www\\.``, ``a@&#8288;b``: the same text once rendered)."""
    text = _MD_SPECIAL.sub(r"\\\1", one_line(text, limit))
    text = _AUTOLINK.sub(lambda m: "@" + WORD_JOINER if m[2] else "\\" + m[0], text)
    return _MD_LEADING.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", text)


def md_code(text, limit: int = MAX_VALUE_CHARS) -> str:
    """Untrusted text as an inline code span whose fence is longer than any backtick run inside."""
    text = one_line(text, limit)
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fenced(lang: str, body: str) -> str:
    fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", body)), default=0) + 1)
    return f"{fence}{lang}\n{body}\n{fence}"


# -- front matter -----------------------------------------------------------------


def hub_license(spdx: str | None) -> dict:
    """The front matter's licence keys for the manifest's ``dataset.source.license``."""
    if spdx is None:
        return {"license": "unknown"}
    lowered = spdx.strip().lower()
    if lowered in HUB_LICENSES:
        return {"license": lowered}
    slug = re.sub(r"[^a-z0-9.-]+", "-", lowered).strip("-.")[:64] or "custom"
    return {"license": "other", "license_name": slug}


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` training items."""
    for bound, name in SIZE_CATEGORIES:
        if n < bound:
            return name
    return "n>1B"


def front_matter(archive: Archive) -> dict:
    """The README's YAML metadata (licence, task, tags, size, pretty name); no dataset viewer for .d3m."""
    ds = archive.manifest.dataset
    return {
        **hub_license(None if ds.source is None else ds.source.license),
        "pretty_name": one_line(ds.name, 100) or "D3M distilled dataset",
        "task_categories": ["image-classification"],
        "tags": list(TAGS),
        "size_categories": [size_category(ds.num_patches)],
        "viewer": False,
    }


# -- body ------------------------------------------------------------------------


def _format_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return str(value)
    return one_line(value)


def build_rows(build: dict) -> list[tuple[str, str]]:
    """(dotted key, value) rows for any build info: nested objects flattened, long numeric lists summarised."""
    rows: list[tuple[str, str]] = []

    def walk(value, key: str, depth: int) -> None:
        if isinstance(value, dict):
            if depth >= MAX_BUILD_DEPTH or not value:
                rows.append((key, f"object of {len(value)} keys" if value else "{}"))
                return
            for name in sorted(value, key=str):
                walk(value[name], f"{key}.{name}" if key else str(name), depth + 1)
        elif isinstance(value, list):
            numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if value and len(numbers) == len(value) and len(value) > MAX_INLINE_LIST:
                mean = sum(numbers) / len(numbers)
                rows.append((key, f"{len(numbers)} values: min {min(numbers):.6g}, mean {mean:.6g}, "
                                  f"max {max(numbers):.6g}"))
            elif all(not isinstance(v, (dict, list)) for v in value) and len(value) <= MAX_INLINE_LIST:
                rows.append((key, "[" + ", ".join(_format_value(v) for v in value) + "]"))
            elif depth < MAX_BUILD_DEPTH and len(value) <= MAX_INLINE_LIST:
                for i, item in enumerate(value):
                    walk(item, f"{key}[{i}]", depth + 1)
            else:
                rows.append((key, f"list of {len(value)} items"))
        else:
            rows.append((key, _format_value(value)))

    if build:
        walk(build, "", 0)
    return rows


def _table(header: tuple[str, ...], rows, limit: int, more: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_escape(cell) for cell in row) + " |" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n… {len(rows) - limit} more {more}")
    return "\n".join(lines)


def loading_snippet(ref: str, allow_download: bool, variant: str | None = None) -> str:
    """The lines that train from the archive with D3MDataset and a DataLoader (``variant``: noted in a comment)."""
    note = "" if variant is None else f"  # renders with the {one_line(variant, 64)!r} weight variant the archive names"
    if not allow_download:
        return (
            "from torch.utils.data import DataLoader\n"
            "from d3mfmt import D3MDataset\n"
            f"loader = DataLoader(D3MDataset({ref!r}), batch_size=64, shuffle=True){note}"
        )
    return (
        "from torch.utils.data import DataLoader\n"
        "from d3mfmt import D3MDataset, RenderOptions\n"
        f"dataset = D3MDataset({ref!r}, render=RenderOptions(allow_download=True)){note}\n"
        "loader = DataLoader(dataset, batch_size=64, shuffle=True)"
    )


def _model_needs(gen) -> str:
    model = gen.model
    if model.id.startswith(BUILTIN_NAMESPACE):
        return f"The model {md_code(model.id)} ships inside d3mfmt: there is nothing else to download."
    identity = md_code(model.identity or "not pinned")
    variant = "" if model.variant is None else (
        f" It renders with the {md_code(model.variant)} weight variant (the {md_code(f'*.{model.variant}.safetensors')}"
        " files of each component), which the archive names, so `D3MDataset` loads it by itself; those files must "
        "be there.")
    if not _REPO_ID.match(model.id):
        return (f"The model was a local folder ({md_code(model.id)}) when this archive was built: you need the same "
                f"weights (content hash {identity}) as a diffusers folder, passed as "
                f"`D3MDataset(..., render=RenderOptions(model=FOLDER))`.{variant}")
    command = ["huggingface-cli", "download", one_line(model.id)]
    if model.revision:
        command += ["--revision", one_line(model.revision)]
    return (
        "The diffusion model must be in the local Hugging Face cache (models are never fetched silently):\n\n"
        + _fenced("bash", " ".join(shlex.quote(part) for part in command))
        + "\n\nor pass `render=RenderOptions(allow_download=True)` to `D3MDataset` (`--allow-download` for "
        f"`d3m-inspect`).{variant} Its files must hash to the pinned identity, which is checked before rendering; "
        "`RenderOptions(allow_model_mismatch=True)` renders with other weights, and `d3m-inspect verify` "
        "measures the drift."
    )


def card_text(data: bytes, file_name: str, *, repo_id: str | None = None, preview: bool = True,
              max_label_bytes: int = MAX_LABEL_TABLE, render_limits: RenderLimits | None = None) -> str:
    """The README.md of a dataset card: YAML front matter, then the body, from the archive's manifest.

    Args:
        data: the archive's bytes (validated here).
        file_name: the archive's file name in the card folder.
        repo_id: ``ORG/NAME`` of the hub dataset; the loading snippet then uses its hf:// id.
        preview: the folder holds preview.png.
        max_label_bytes, render_limits: as for ``d3mfmt.load``.

    Example:
        >>> text = card_text(open("spec/vectors/topk.d3m", "rb").read(), "topk.d3m")   # doctest: +SKIP
        >>> text.splitlines()[1]                                                     # doctest: +SKIP
        'license: cc-by-sa-3.0'
    """
    import yaml

    members = container.read_zip(data)
    archive = load_members(members, max_label_bytes=max_label_bytes, render_limits=render_limits)
    file_bytes, file_sha256 = len(data), hashlib.sha256(data).hexdigest()
    s = summarize(archive, {name: len(b) for name, b in members.items()}, file_bytes)
    m = archive.manifest
    ds, gen = m.dataset, m.generator
    ref = f"hf://datasets/{repo_id}/{file_name}" if repo_id else file_name
    meta = yaml.safe_dump(front_matter(archive), sort_keys=False, allow_unicode=True, width=1 << 16)
    # 1. what this is
    parts = [
        f"---\n{meta}---",
        f"# {md_escape(ds.name, 100)}",
        f"A distilled image-classification dataset in the `.d3m` format of [D3M]({PAPER}) "
        "(one category, one prompt): instead of images it stores, for every class, one learned text embedding, "
        "for every image a seed, and for every patch a soft label from a teacher. `D3MDataset` regenerates the "
        "images with the pinned diffusion model and yields patches with their soft labels.",
        f"- **{ds.num_classes} classes**, {ds.ipc} images per class, each a {ds.grid}×{ds.grid} collage: "
        f"{ds.num_images} images, **{ds.num_patches} training patches**\n"
        f"- **{file_bytes:,} bytes** ({s['bytes_per_class']:,} per class): {md_code(file_name)}, "
        f"sha256 {md_code(file_sha256)}\n"
        f"- content hash {md_code(s['content_hash'])}",
    ]
    # 2. how to load it, and what it needs locally
    parts += [
        "## Load it",
        _fenced("python", loading_snippet(ref, allow_download=bool(repo_id), variant=gen.model.variant)),
        "Each item is `(patch float32 [3, h, w] in [0, 1], soft label float32 [C], class index)`; "
        "rendered images are cached on disk, so later epochs only read.",
        _model_needs(gen),
    ]
    if repo_id is None:
        parts.append(f"Or from any URL, pinned by its sha256: `D3MDataset(\"https://…/{file_name}#sha256={file_sha256}\", "
                     "render=RenderOptions(allow_download=True))`.")
    if preview:
        parts += ["## Preview", f"The first classes, regenerated (stored top-1 label and probability on each patch):\n\n"
                  f"![preview]({PREVIEW})"]
    # 3. classes
    parts += ["## Classes", _table(("index", "id", "name"), [(str(i), c.id, c.name) for i, c in enumerate(ds.classes)],
                                   MAX_CLASS_ROWS, "classes (see `d3m-inspect summary --json`)")]
    # 4. generator, teacher, labels, source; 5. build provenance, and how to check the pixels
    parts += _recipe_sections(m, s["labels"]) + _provenance_sections(m, ref, repo_id)
    return "\n\n".join(parts) + "\n"


def _recipe_sections(m, lab: dict) -> list[str]:
    """The generator, teacher, soft-label and source sections."""
    ds, gen, teacher, model = m.dataset, m.generator, m.teacher, m.generator.model
    return [
        "## Generator",
        f"- model {md_code(model.id)}, revision {md_code(model.revision or 'none')}, "
        + ("" if model.variant is None else f"weight variant {md_code(model.variant)}, ")
        + f"content hash {md_code(model.identity or 'not pinned')}\n"
        f"- {md_escape(gen.pipeline)}, {md_escape(gen.scheduler)}, {gen.steps} steps, guidance {gen.guidance_scale:g}, "
        f"{gen.height}×{gen.width} px, {gen.dtype}\n"
        f"- prompt template {md_code(gen.prompt_template)}",
        "## Teacher",
        "no teacher recorded" if teacher is None else
        f"- {md_code(teacher.name)}, identity {md_code(teacher.identity or 'none')}"
        + ("" if teacher.accuracy is None else f", held-out accuracy **{teacher.accuracy:.4f}**"),
        "## Soft labels",
        f"- encoding {md_code(lab['kind'])}" + ("" if lab["k"] is None else f", k = {lab['k']}")
        + ("" if lab["values"] is None else f", values {md_code(lab['values'])}")
        + f", temperature {lab['temperature']:g}, {lab['bytes_per_patch']} bytes per patch",
        "## Source and licence",
        "no source recorded" if ds.source is None else
        f"- {md_escape(ds.source.name)}, fingerprint {md_code(ds.source.fingerprint or 'none')}, "
        f"licence {md_escape(ds.source.license or 'unknown')}",
        "Images regenerated from it may also be subject to the diffusion model's licence.",
    ]


def _provenance_sections(m, ref: str, repo_id: str | None) -> list[str]:
    """Whatever the build recorded, and the command that checks the pixels against the fingerprints."""
    rows = build_rows(m.build)
    parts = ["## Build", _table(("key", "value"), rows, MAX_BUILD_ROWS, "entries (see manifest.json's build)")
             if rows else "no build information recorded"]
    if m.fingerprint_size is not None:
        verify = f"d3m-inspect verify {shlex.quote(ref)}" + (" --allow-download" if repo_id else "")
        parts += ["## Check it", _fenced("bash", verify)
                  + "\n\nregenerates a sample and compares it with the fingerprints stored in the archive."]
    return parts


# -- the folder --------------------------------------------------------------------


def write_card(source, out_dir: str | os.PathLike, *, repo_id: str | None = None,
               render: RenderOptions = RenderOptions(), cache_dir: str | os.PathLike | None = None,
               preview_classes: int = CARD_PREVIEW_CLASSES, per_class: int = CARD_PREVIEW_PER_CLASS,
               max_label_bytes: int = MAX_LABEL_TABLE) -> Path:
    """Write a dataset-card folder: the archive, ``preview.png`` and ``README.md``.

    The folder is assembled beside ``out_dir`` and renamed into place, so a
    failure leaves no half-written card.

    Args:
        source: the archive, as anything ``D3MDataset`` accepts as a path.
        out_dir: the card folder; must not exist yet (or be empty); missing parents are created.
        repo_id: ``ORG/NAME`` the card will be uploaded to (used in the loading snippet).
        render, cache_dir: how the preview renders, as for ``D3MDataset``.
        preview_classes, per_class: rows and columns of ``preview.png``.
        max_label_bytes: as for ``D3MDataset`` (``render.limits`` bounds the render cost).

    Returns:
        ``out_dir`` as a Path.

    Example:
        >>> write_card("spec/vectors/topk.d3m", "/tmp/topk-card")            # doctest: +SKIP
        PosixPath('/tmp/topk-card')
    """
    # 1. check inputs before rendering anything
    out = Path(out_dir)
    if repo_id is not None and (not isinstance(repo_id, str) or not _REPO_ID.match(repo_id)):
        raise D3MError(f"repo_id must look like 'org/name', got {repo_id!r}")
    from .export import MAX_PREVIEW_CLASSES, MAX_PREVIEW_PER_CLASS

    for name, value, most in (("preview_classes", preview_classes, MAX_PREVIEW_CLASSES),
                              ("per_class", per_class, MAX_PREVIEW_PER_CLASS)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise D3MError(f"{name} must be an integer in 1..{most}, got {value!r}")
    check_new_folder(out)
    from .dataset import D3MDataset

    dataset = D3MDataset(source, render=render, cache_dir=cache_dir, max_label_bytes=max_label_bytes)
    # 2. the archive's bytes and the card's text, before anything is written
    data = container.read_bytes(dataset.path)
    file_name = safe_file_name(Path(dataset.path).name, default="archive", suffix=".d3m")
    text = card_text(data, file_name, repo_id=repo_id, max_label_bytes=max_label_bytes,
                     render_limits=dataset.render.limits)
    # 3. assemble in a temporary folder beside out_dir, then rename it into place
    from .export import preview_grid

    with atomic_folder(out) as tmp:
        classes = list(range(min(preview_classes, dataset.num_classes)))
        preview_grid(dataset, classes, per_class).save(tmp / PREVIEW)
        write_atomic(tmp / file_name, data)
        (tmp / README).write_text(text, encoding="utf-8")
    return out
