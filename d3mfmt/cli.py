"""``d3m-inspect``: summarise, check, verify, preview and export .d3m archives.

Data on stdout, progress and problems on stderr. Reading modes (summary,
``--json``, ``--check``) never import torch; the others load the diffusion model.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import container
from .archive import load_members
from .errors import D3MError, D3MFormatError
from .summary import check, render_text, summarize
from .terminal import printable


# transformers announces at import that torchvision is absent; a CLI user does not need that
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"d3m-inspect: {printable(message)}", err=True)
    sys.exit(code)


def _parse_classes(spec: str | None, names: list[str], ids: list[str]) -> list[int]:
    """'0,3,seven' -> class indices (by index, id or name)."""
    if not spec:
        return list(range(len(names)))
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.isdigit() and int(part) < len(names):
            out.append(int(part))
        elif part in ids:
            out.append(ids.index(part))
        elif part in names:
            out.append(names.index(part))
        else:
            raise D3MError(f"--select: {part!r} is not a class index (0..{len(names) - 1}), id or name of this archive")
    if not out:
        raise D3MError(f"--select {spec!r} names no class; give comma-separated class indices, ids or names")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--check", "check_only", is_flag=True, help="Validate everything; exit 0 if valid, 1 otherwise.")
@click.option("--verify", is_flag=True, help="Regenerate a sample and compare fingerprints; exit 1 beyond the tolerance.")
@click.option("--verify-images", "n_verify", type=int, default=8, show_default=True, help="Images --verify regenerates.")
@click.option("--tolerance", type=int, default=None, help="--verify tolerance in 8-bit levels [default: 8].")
@click.option("--preview", type=click.Path(dir_okay=False), help="Write a PNG grid of regenerated images, a row per class.")
@click.option("--select", "classes", help="Classes --preview draws: comma-separated indices, ids or names [default: all].")
@click.option("--per-class", type=int, default=8, show_default=True, help="Images per class in --preview.")
@click.option("--export-images", type=click.Path(file_okay=False), help="Write PNGs in an ImageFolder layout.")
@click.option("--unit", type=click.Choice(["patch", "image"]), default="patch", show_default=True,
              help="--export-images writes patches or whole collages.")
@click.option("--export-embeddings", type=click.Path(file_okay=False),
              help="Write one diffusers textual-inversion file per class.")
@click.option("--device", help="Rendering device [default: cuda if available, else cpu].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Rendering dtype.")
@click.option("--model", help="Model id or folder to render with instead of the archive's.")
@click.option("--allow-model-mismatch", is_flag=True, help="Render even if the model differs from the pinned one.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Pixel cache folder.")
@click.option("--allow-download", is_flag=True,
              help="Fetch an hf:// or URL archive, or a hub model, missing from the local caches.")
@click.option("--sha256", help="Expected sha256 of the archive file (for a URL: instead of #sha256=...).")
@click.option("--allow-unpinned", is_flag=True, help="Accept a URL without a sha256 (fetched every time, unverified).")
@click.option("--card", type=click.Path(file_okay=False),
              help="Write a dataset-card folder (archive, preview.png, README.md) ready for huggingface-cli upload.")
@click.option("--repo-id", help="ORG/NAME the --card folder will be uploaded to (used in its loading snippet).")
def inspect_main(path, as_json, check_only, verify, n_verify, tolerance, preview, classes, per_class,
                 export_images, unit, export_embeddings, device, dtype, model, allow_model_mismatch, cache_dir,
                 allow_download, sha256, allow_unpinned, card, repo_id) -> None:
    """Summarise the .d3m archive PATH (and check, verify, preview or export it).

    PATH may also be hf://datasets/ORG/NAME[@REVISION]/FILE.d3m or an https:// URL
    pinned by #sha256=<hex>; both are read from the local caches unless --allow-download.
    """
    try:
        if repo_id and not card:
            raise D3MError("--repo-id names where a --card folder goes; pass --card DIR too")
        from .sources import resolve_archive

        local = str(resolve_archive(path, allow_download=allow_download, sha256=sha256, allow_unpinned=allow_unpinned))
        data = container.read_bytes(local)
        if check_only:
            problems = check(data)
            for problem in problems:
                click.echo(printable(f"{path}: {problem}"), err=True)
            if problems:
                sys.exit(1)
            click.echo(printable(f"{path}: valid"))
            return
        members = container.read_zip(data)
        archive = load_members(members)
        if not (verify or preview or export_images or export_embeddings or card):
            summary = summarize(archive, {name: len(b) for name, b in members.items()}, len(data))
            click.echo(json.dumps(summary, indent=1) if as_json else render_text(summary))
            return
        if device is not None and (verify or preview or export_images or card):
            from .generator import check_device

            check_device(device)  # before any model loads or output folder appears
        render = dict(model=model, device=device, dtype=dtype, allow_model_mismatch=allow_model_mismatch,
                      allow_download=allow_download)
        ok = True
        if export_embeddings:
            from .export import export_embeddings as write_embeddings

            files = write_embeddings(archive, export_embeddings)
            click.echo(printable(f"wrote {len(files)} textual-inversion files to {export_embeddings}"))
        if verify:
            ok = _verify(archive, n_verify, tolerance, render)
        if preview or export_images or card:
            from .dataset import D3MDataset

            ds = D3MDataset(local, unit=unit, cache_dir=cache_dir, **render)
            if preview:
                from .export import preview_grid, write_png

                names, ids = ds.classes, [c.id for c in archive.manifest.dataset.classes]
                write_png(preview_grid(ds, _parse_classes(classes, names, ids), per_class), preview)
                click.echo(printable(f"wrote {preview}"))
            if export_images:
                from .export import export_images as write_images

                count = write_images(ds, export_images)
                click.echo(printable(f"wrote {count} PNGs to {export_images}"))
            if card:
                from .card import write_card

                write_card(ds, card, repo_id=repo_id, per_class=per_class)
                click.echo(printable(f"wrote a dataset card to {card}"))
        if not ok:
            sys.exit(1)
    except D3MFormatError as exc:  # a problem of this file: name it, as --check's lines do
        _fail(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")
    except D3MError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or path}: {exc.strerror or exc}")


def _verify(archive, n: int, tolerance: int | None, render: dict) -> bool:
    from .generator import Regenerator
    from .verify import DEFAULT_TOLERANCE, check_verify, verify

    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    check_verify(archive, n, tolerance)
    regen = Regenerator(archive.manifest.generator, archive.embeddings, **render)
    report = verify(archive, regen, n, tolerance)
    for line in report.lines([c.name for c in archive.manifest.dataset.classes]):
        click.echo(line)
    return report.ok
