"""``d3m-inspect``: summarise, check, verify, preview, export and publish .d3m archives.

One subcommand per mode, each with only its own options (an option without
its mode is a usage error); ``summary`` is the default, so ``d3m-inspect FILE``
and ``d3m-inspect FILE --json`` summarise. Data on stdout, progress and
problems on stderr. The reading modes (summary, ``--json``, ``check``) never
import torch; the others load the diffusion model.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import click

from . import container
from .archive import load_members
from .downloads import DownloadLimits
from .errors import D3MError, D3MFormatError
from .labels import MAX_LABEL_PAYLOAD, MAX_LABEL_TABLE
from .render import DTYPE_NAMES, RenderOptions
from .renderable import UNBOUNDED, RenderLimits
from .summary import check as check_archive, render_text, summarize, summary_json
from .terminal import printable
from .verify import DEFAULT_TOLERANCE

# transformers announces at import that torchvision is absent; a CLI user does not need that
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_DOWNLOAD = DownloadLimits()
PREVIEW_PER_CLASS = 8  # columns of `preview` (the card's default is card.CARD_PREVIEW_PER_CLASS, also 8)
SUBCOMMANDS = "summary, check, verify, preview, export images, export embeddings, card"
# the single-command spellings before subcommands, and what replaced them
OLD_SPELLINGS = {
    "--check": "check FILE",
    "--verify": "verify FILE",
    "--verify-images": "verify FILE --images N",
    "--preview": "preview FILE -o OUT.png",
    "--export-images": "export images FILE -o DIR",
    "--export-embeddings": "export embeddings FILE -o DIR",
    "--card": "card FILE -o DIR",
}


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"d3m-inspect: {printable(message)}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def _reporting(path: str):
    """Bad input as one line on stderr and exit 1, never a traceback; a format error names the file."""
    try:
        yield
    except D3MFormatError as exc:  # a problem of this file: name it, as `check`'s lines do
        _fail(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")
    except D3MError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or path}: {exc.strerror or exc}")


class _Mode(click.Command):
    """A subcommand whose unknown option is answered with the subcommands that take it."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            name = exc.option_name
            if name in OLD_SPELLINGS:
                use = f"`d3m-inspect {OLD_SPELLINGS[name]}`"
            else:
                owners = _commands_taking(ctx.find_root().command, name, "d3m-inspect")
                if not owners:
                    raise
                use = " or ".join(f"`{owner}`" for owner in owners)
            raise click.UsageError(f"{name} is not an option of `{ctx.command_path}`: each mode is a subcommand "
                                   f"({SUBCOMMANDS}) with its own options; use {use}", ctx) from None


def _commands_taking(command: click.Command, option: str, path: str) -> list[str]:
    """The paths of the subcommands under ``command`` that take ``option``, e.g. ``["d3m-inspect verify"]``."""
    if isinstance(command, click.Group):
        return [p for name, sub in command.commands.items() for p in _commands_taking(sub, option, f"{path} {name}")]
    return [path] if any(option in param.opts for param in command.params) else []


class _Group(click.Group):
    """Subcommands listed in the order they were added; ``default_command`` runs when the first argument names none."""

    command_class = _Mode

    def __init__(self, *args, default_command: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def list_commands(self, ctx):
        return list(self.commands)

    def parse_args(self, ctx, args):
        if self.default_command and args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


_Group.group_class = _Group


TRUSTED = UNBOUNDED  # --trust-render-cost


@dataclass(frozen=True)
class _Source:
    """Where the archive comes from and what reading it may cost: the source options of every subcommand."""

    ref: str
    allow_download: bool
    sha256: str | None
    allow_unpinned: bool
    download: DownloadLimits
    max_label_bytes: int
    render_limits: RenderLimits | None  # None: the reader's defaults

    def local(self) -> str:
        from .sources import resolve_archive

        return str(resolve_archive(self.ref, allow_download=self.allow_download, sha256=self.sha256,
                                   allow_unpinned=self.allow_unpinned, download_limits=self.download))

    @property
    def limits(self) -> dict:
        """The reading keywords of ``d3mfmt.load`` and ``summary.check``."""
        return {"max_label_bytes": self.max_label_bytes, "render_limits": self.render_limits}


_SECONDS = click.FloatRange(min=0, min_open=True)
# what reading may cost: every subcommand's, after the source options
_READ_LIMIT_OPTIONS = (
    click.option("--download-timeout", type=_SECONDS, default=DEFAULT_DOWNLOAD.timeout_s, show_default=True,
                 metavar="SECONDS", help="Longest wait of one network operation."),
    click.option("--download-deadline", type=_SECONDS, default=DEFAULT_DOWNLOAD.deadline_s, show_default=True,
                 metavar="SECONDS", help="Longest time a whole download may take."),
    click.option("--max-label-bytes", type=click.IntRange(min=1, max=MAX_LABEL_PAYLOAD), default=MAX_LABEL_TABLE,
                 show_default=True, help="Cap on the decoded label table; raise it for a trusted dense archive."),
    click.option("--trust-render-cost", is_flag=True,
                 help="Lift the bounds on the render cost an archive may ask (steps, size, images)."),
)


def _archive_input(render: bool = False, cache: bool = False):
    """FILE and the source options; with ``render`` the render options too, joined into one RenderOptions.

    The command receives ``source`` (a ``_Source``), with ``render`` also
    ``render`` (a ``RenderOptions``), with ``cache`` also ``cache_dir``; its
    body runs under ``_reporting``.
    """
    options = [
        click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=str)),
        click.option("--allow-download", is_flag=True,
                     help="Fetch an hf:// or URL archive" + (", or a hub model," if render else "")
                     + " missing from the local caches."),
        click.option("--sha256", help="Expected sha256 of the archive file (for a URL: instead of #sha256=...)."),
        click.option("--allow-unpinned", is_flag=True,
                     help="Accept a URL without a sha256 (fetched every time, unverified)."),
        *_READ_LIMIT_OPTIONS,
    ]
    if render:
        options += [
            click.option("--model", help="Model id or folder to render with instead of the archive's."),
            click.option("--device", help="Rendering device [default: cuda if available, else cpu]."),
            click.option("--dtype", type=click.Choice(DTYPE_NAMES),
                         help="Rendering dtype [default: float16 on cuda, else float32]."),
            click.option("--allow-model-mismatch", is_flag=True,
                         help="Render even if the model differs from the pinned one."),
            click.option("--compile", "compile_unet", is_flag=True, help="torch.compile the UNet (GPU throughput)."),
            click.option("--variant", help="Weight variant to load (e.g. fp16) instead of the archive's "
                                           "generator.model.variant."),
        ]
    if cache:
        options.append(click.option("--cache-dir", type=click.Path(file_okay=False),
                                    help="Pixel cache root [default: $D3MFMT_CACHE_DIR or ~/.cache/d3mfmt/images]."))

    def decorator(f):
        @functools.wraps(f)
        def command(path, allow_download, sha256, allow_unpinned, download_timeout, download_deadline,
                    max_label_bytes, trust_render_cost, **kwargs):
            with _reporting(path):  # DownloadLimits refuses an infinite deadline, which click lets through
                source = _Source(path, allow_download, sha256, allow_unpinned,
                                 DownloadLimits(download_timeout, download_deadline), max_label_bytes,
                                 TRUSTED if trust_render_cost else None)
                if render:
                    kwargs["render"] = RenderOptions(
                        model=kwargs.pop("model"), device=kwargs.pop("device"), dtype=kwargs.pop("dtype"),
                        allow_model_mismatch=kwargs.pop("allow_model_mismatch"), allow_download=allow_download,
                        compile=kwargs.pop("compile_unet"), variant=kwargs.pop("variant"), limits=source.render_limits,
                    )
                return f(source=source, **kwargs)

        for option in reversed(options):
            command = option(command)
        return command

    return decorator


def _out_option(kind: str, what: str):
    """``-o/--out``: a PNG file, or a folder."""
    path_type = click.Path(dir_okay=False) if kind == "file" else click.Path(file_okay=False)
    return click.option("-o", "--out", required=True, type=path_type, metavar="PNG" if kind == "file" else "DIR",
                        help=what)


@click.group("d3m-inspect", cls=_Group, default_command="summary", subcommand_metavar="[COMMAND] FILE [ARGS]...",
             context_settings={"help_option_names": ["-h", "--help"]})
def inspect_main() -> None:
    """Inspect the .d3m archive FILE: `d3m-inspect FILE` summarises it (the `summary` subcommand).

    FILE may also be hf://datasets/ORG/NAME[@REVISION]/FILE.d3m or an https:// URL
    pinned by #sha256=<hex>; both are read from the local caches unless --allow-download.
    """



@inspect_main.command()
@_archive_input()
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def summary(source: _Source, as_json: bool) -> None:
    """Summarise FILE: classes, generator, teacher, labels, members (the default subcommand)."""
    data = container.read_bytes(source.local())
    members = container.read_zip(data)
    s = summarize(load_members(members, **source.limits), {name: len(b) for name, b in members.items()}, len(data))
    click.echo(summary_json(s) if as_json else render_text(s))


@inspect_main.command()
@_archive_input()
def check(source: _Source) -> None:
    """Validate everything in FILE; exit 0 if valid, 1 with one line per problem otherwise."""
    problems = check_archive(container.read_bytes(source.local()), **source.limits)
    for problem in problems:
        click.echo(printable(f"{source.ref}: {problem}"), err=True)
    if problems:
        sys.exit(1)
    click.echo(printable(f"{source.ref}: valid"))


@inspect_main.command()
@_archive_input(render=True)
@click.option("--images", "n_images", type=int, default=8, show_default=True, help="Images to regenerate.")
@click.option("--tolerance", type=int, default=DEFAULT_TOLERANCE, show_default=True,
              help="Largest fingerprint drift accepted, in 8-bit levels.")
def verify(source: _Source, render: RenderOptions, n_images: int, tolerance: int) -> None:
    """Regenerate a sample of FILE's images and compare their fingerprints; exit 1 beyond the tolerance."""
    from .archive import load_file
    from .verify import verify as measure_drift

    archive = load_file(source.local(), **source.limits)
    report = measure_drift(archive, render, n_images, tolerance)
    for line in report.lines([c.name for c in archive.manifest.dataset.classes]):
        click.echo(line)
    if not report.ok:
        sys.exit(1)


def _dataset(source: _Source, render: RenderOptions, cache_dir, unit: str = "patch"):
    from .dataset import D3MDataset

    return D3MDataset(source.local(), unit=unit, cache_dir=cache_dir, render=render,
                      max_label_bytes=source.max_label_bytes)


@inspect_main.command()
@_archive_input(render=True, cache=True)
@_out_option("file", "The PNG to write (a row per class; PNG whatever the suffix).")
@click.option("--select", "classes", help="Classes to draw: comma-separated indices, ids or names [default: all].")
@click.option("--per-class", type=int, default=PREVIEW_PER_CLASS, show_default=True, help="Images per class.")
def preview(source: _Source, render: RenderOptions, cache_dir, out: str, classes: str | None, per_class: int) -> None:
    """Write a PNG grid of FILE's regenerated images, with each patch's stored top-1 label."""
    from .export import MAX_PREVIEW_CLASSES, preview_grid, write_png

    ds = _dataset(source, render, cache_dir)
    ids = [c.id for c in ds.archive.manifest.dataset.classes]
    chosen = _parse_classes(classes, ds.classes, ids)
    if classes is None and len(chosen) > MAX_PREVIEW_CLASSES:
        chosen = chosen[:MAX_PREVIEW_CLASSES]
        click.echo(f"d3m-inspect: showing the first {MAX_PREVIEW_CLASSES} of {len(ds.classes)} classes (the most "
                   "one sheet holds); choose others with --select", err=True)
    write_png(preview_grid(ds, chosen, per_class), out)
    click.echo(printable(f"wrote {out}"))


@inspect_main.group()
def export() -> None:
    """Leave the format: regenerated images or the class embeddings."""


@export.command("images")
@_archive_input(render=True, cache=True)
@_out_option("dir", "The folder to write (ImageFolder layout); must not exist or be empty.")
@click.option("--unit", type=click.Choice(["patch", "image"]), default="patch", show_default=True,
              help="Write patches or whole collages.")
def export_images(source: _Source, render: RenderOptions, cache_dir, out: str, unit: str) -> None:
    """Write FILE's regenerated images as PNGs, a folder per class."""
    from .export import export_images as write_images

    count = write_images(_dataset(source, render, cache_dir, unit), out)
    click.echo(printable(f"wrote {count} PNGs to {out}"))


@export.command("embeddings")
@_archive_input()
@_out_option("dir", "The folder to write; must not exist or be empty.")
def export_embeddings(source: _Source, out: str) -> None:
    """Write one diffusers textual-inversion file per class of FILE."""
    from .archive import load_file
    from .export import export_embeddings as write_embeddings

    files = write_embeddings(load_file(source.local(), **source.limits), out)
    click.echo(printable(f"wrote {len(files)} textual-inversion files to {out}"))


@inspect_main.command()
@_archive_input(render=True, cache=True)
@_out_option("dir", "The card folder to write; must not exist or be empty.")
@click.option("--repo-id", help="ORG/NAME the folder will be uploaded to (used in its loading snippet).")
@click.option("--per-class", type=int, default=PREVIEW_PER_CLASS, show_default=True,
              help="Images per class in preview.png.")
def card(source: _Source, render: RenderOptions, cache_dir, out: str, repo_id: str | None, per_class: int) -> None:
    """Write a dataset-card folder for FILE (archive, preview.png, README.md) ready for huggingface-cli upload."""
    from .card import write_card

    write_card(source.local(), out, repo_id=repo_id, render=render, cache_dir=cache_dir, per_class=per_class,
               max_label_bytes=source.max_label_bytes)
    click.echo(printable(f"wrote a dataset card to {out}"))


def _parse_classes(spec: str | None, names: list[str], ids: list[str]) -> list[int]:
    """'0,3,seven' -> class indices (by index, id or name)."""
    if spec is None:
        return list(range(len(names)))
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.isascii() and part.isdigit() and int(part) < len(names):  # not '²', which isdigit() takes
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
