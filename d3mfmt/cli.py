"""``d3m-inspect``: summarise and check .d3m archives. Data on stdout, problems on stderr."""

from __future__ import annotations

import json
import sys

import click

from . import container
from .archive import load_members
from .errors import D3MError
from .summary import check, render_text, summarize


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"d3m-inspect: {message}", err=True)
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--check", "check_only", is_flag=True, help="Validate everything; exit 0 if valid, 1 otherwise.")
def inspect_main(path: str, as_json: bool, check_only: bool) -> None:
    """Summarise the .d3m archive PATH."""
    try:
        data = container.read_bytes(path)
        if check_only:
            problems = check(data)
            for problem in problems:
                click.echo(f"{path}: {problem}", err=True)
            if problems:
                sys.exit(1)
            click.echo(f"{path}: valid")
            return
        members = container.read_zip(data)
        archive = load_members(members)
    except D3MError as exc:
        _fail(str(exc))
    summary = summarize(archive, {name: len(b) for name, b in members.items()}, len(data))
    click.echo(json.dumps(summary, indent=1) if as_json else render_text(summary))

