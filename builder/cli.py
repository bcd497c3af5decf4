"""``d3m-build``: real images -> .d3m archive. Parses options into settings and calls builder.run.

Examples:
    d3m-build --demo -o mnist_ipc10.d3m
    d3m-build /data/imagenet100/train -o in100_ipc10.d3m --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --teacher my_teachers:resnet18_in100 --classes classes.txt --ipc 10 --grid 2
    d3m-build ... --workdir wd --shard 0/4      # one of four shards (any launcher)
    d3m-build merge wd0 wd1 wd2 wd3 -o out.d3m  # join the finished shards

Every default lives in the settings dataclasses (builder/build.py, builder/defaults.py);
an option left out keeps it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

import click

from d3mfmt.errors import D3MError
from d3mfmt.terminal import printable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _default(cls, name: str):
    """A dataclass field's default (for help texts: the dataclass stays the one source)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _settings_classes():
    from .build import BuildSettings
    from .inversion import InversionSettings
    from .patches import PatchSettings

    return BuildSettings, InversionSettings, PatchSettings


def _help(text: str, cls_index: int, name: str) -> str:
    return f"{text} [default: {_default(_settings_classes()[cls_index], name)}]"


def _model_help(text: str, field: str) -> str:
    from .defaults import describe

    return f"{text} [default: the model's; {describe(field)}]"


class _BuildByDefault(click.Group):
    """``d3m-build ARGS`` means ``d3m-build build ARGS``; ``d3m-build merge ...`` is its own action."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["build", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_BuildByDefault, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Distil images into a .d3m archive: `d3m-build [build] DATA -o OUT ...` or `d3m-build merge WORKDIR... -o OUT`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


def _label_options(f):
    for option in reversed([
        click.option("--labels", "label_kind", type=click.Choice(["topk", "dense", "hard"]), default="topk",
                     show_default=True, help="Soft-label encoding."),
        click.option("--k", type=int, help="Entries kept per label for topk [default: 5, at most the class count]."),
        click.option("--values", type=click.Choice(["u8sqrt", "u8", "f16", "f32"]),
                     help="Label value codec [default: u8sqrt for topk, f16 for dense]."),
        click.option("--min-agreement", type=float,
                     help="Fail (no archive) when the teacher agrees with a class on fewer regenerated patches "
                          "than this fraction, e.g. 0.5 [default: only warn]."),
    ]):
        f = option(f)
    return f


@main.command("build")
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Archive to write.")
@click.option("--demo", is_flag=True, help="Built-in model, teacher and MNIST train split, with the model's defaults.")
@click.option("--model", help="Diffusion model: built-in id, diffusers folder or hub id (local cache). Required without --demo.")
@click.option("--revision", help="Hub revision of --model.")
@click.option("--teacher", help="Teacher: built-in name or module:function. Required without --demo.")
@click.option("--classes", "class_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Class list FILE: folder names (e.g. WordNet ids) in the teacher's logit order, one per line, "
                   "optional name after a space [default: sorted folder names].")
@click.option("--ignore-class-order", is_flag=True,
              help="Build even if the teacher seems to take the classes in another order than the data.")
@click.option("--ipc", type=int, help=_help("Distilled images per class.", 0, "ipc"))
@click.option("--grid", type=int, help=_help("Patches per side of each collage.", 0, "grid"))
@click.option("--resolution", type=int, help=_model_help("Collage side in pixels.", "resolution"))
@click.option("--steps", type=int, help=_model_help("DDIM steps.", "steps"))
@click.option("--guidance", type=float, help=_model_help("Classifier-free guidance scale.", "guidance_scale"))
@click.option("--template", help=_model_help("Prompt template containing {token}.", "collage_template"))
@click.option("--vectors", type=int, help=_help("Token vectors per class.", 1, "n_vectors"))
@click.option("--ti-steps", type=int, help=_model_help("Textual-inversion steps per class.", "ti_steps"))
@click.option("--ti-lr", type=float, help=_model_help("Textual-inversion learning rate.", "ti_lr"))
@click.option("--ti-batch", type=int, help=_model_help("Textual-inversion batch size.", "ti_batch"))
@click.option("--n-crops", type=int, help=_help("Random crops scored per real image.", 2, "n_crops"))
@click.option("--max-images", type=int, help=_help("Real images per class considered.", 2, "max_images"))
@click.option("--seed", type=int, help=_help("Base seed.", 0, "seed"))
@click.option("--seed-candidates", type=int, help=_help("Render M candidates per kept image.", 0, "seed_candidates"))
@click.option("--temperature", type=float, help=_help("Teacher softmax temperature.", 0, "temperature"))
@_label_options
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Checkpoints [default: OUT.work].")
@click.option("--shard", default="0/1", show_default=True,
              help="Build only classes c with c % n == i; 'auto' reads RANK/WORLD_SIZE (torchrun, accelerate) or Slurm.")
@click.option("--device", help="cuda, cuda:N or cpu [default: cuda if available].")
def build_command(data, out, demo, model, revision, teacher, class_file, ignore_class_order, ipc, grid, resolution,
                  steps, guidance, template, vectors, ti_steps, ti_lr, ti_batch, n_crops, max_images, seed,
                  seed_candidates, temperature, label_kind, k, values, min_agreement, workdir, shard, device) -> None:
    """Distil the ImageFolder DATA (or the built-in MNIST split with --demo) into the archive OUT."""
    from .build import BuildSettings, InversionSettings, PatchSettings, demo_settings, parse_shard
    from .run import build_archive, label_encoding
    from .sources import ImageFolderSource, MnistSource, read_class_list
    from .teacher_spec import resolve_teacher
    from .teachers import mnist_test_accuracy

    def given(**values):  # only what the user passed: everything else keeps the dataclass default
        return {key: value for key, value in values.items() if value is not None}

    with _errors():
        # 1. where the images come from, and which model and teacher: demo, or named by the user
        if demo:
            clash = [flag for flag, v in (("DATA", data), ("--model", model), ("--teacher", teacher),
                                          ("--classes", class_file)) if v is not None]
            if clash:
                raise D3MError(f"--demo uses the built-in MNIST data, model and teacher; drop {', '.join(clash)}")
            source, base = MnistSource("train"), demo_settings()
        else:
            missing = [flag for flag, v in (("DATA", data), ("--model", model), ("--teacher", teacher)) if v is None]
            if missing:
                raise D3MError(
                    f"a build on your own data needs {' and '.join(missing)} (e.g. DATA=/data/train "
                    "--model stable-diffusion-v1-5/stable-diffusion-v1-5 --teacher my_module:make_teacher); "
                    "--demo runs the built-in MNIST example")
            ids, names = read_class_list(class_file) if class_file else (None, None)
            source, base = ImageFolderSource(data, ids, names), BuildSettings(model=model, teacher=teacher)
        # 2. options onto settings
        settings = dataclasses.replace(
            base,
            **given(revision=revision, ipc=ipc, grid=grid, resolution=resolution, steps=steps, guidance_scale=guidance,
                    prompt_template=template, seed=seed, seed_candidates=seed_candidates, temperature=temperature),
            patches=PatchSettings(**given(n_crops=n_crops, max_images=max_images)),
            inversion=InversionSettings(**given(steps=ti_steps, lr=ti_lr, batch=ti_batch, n_vectors=vectors)),
        )
        labels = label_encoding(label_kind, k, values, settings.temperature)
        # 3. build
        result = build_archive(
            source, settings, out, labels=labels, workdir=workdir, shard=parse_shard(shard), device=device,
            check_order=not ignore_class_order, min_agreement=min_agreement,
            teacher_accuracy=mnist_test_accuracy(resolve_teacher(settings.teacher)[0]) if demo else None,
        )
    click.echo("\n".join(printable(line) for line in result.summary), err=True)
    if result.out is not None:
        click.echo(str(result.out))


@main.command("merge")
@click.argument("workdirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Archive to write.")
@_label_options
def merge_command(workdirs, out, label_kind, k, values, min_agreement) -> None:
    """Write OUT from the finished work directories of every shard of one build (labels: as the build used)."""
    from .run import label_encoding, merge_archives

    with _errors():
        labels = label_encoding(label_kind, k, values)  # the temperature comes from the build's record
        result = merge_archives(list(workdirs), out, labels=labels, min_agreement=min_agreement)
    click.echo("\n".join(printable(line) for line in result.summary), err=True)
    click.echo(str(result.out))


@contextlib.contextmanager
def _errors():
    """D3MError -> one line on stderr, exit 1 (no traceback)."""
    try:
        yield
    except D3MError as exc:
        click.echo(printable(f"d3m-build: {exc}"), err=True)
        sys.exit(1)
