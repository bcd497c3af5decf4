"""``d3m-build``: real images -> .d3m archive. Maps options onto settings and calls the library.

Examples:
    d3m-build --demo -o mnist_ipc10.d3m
    d3m-build /data/imagenet100/train -o in100_ipc10.d3m --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --teacher my_teachers:resnet18_in100 --classes classes.txt --ipc 10 --grid 2
    d3m-build ... --workdir wd --shard 0/4      # one of four shards (any launcher)
    d3m-build merge wd0 wd1 wd2 wd3 -o out.d3m  # join the finished shards

Every default lives in the settings dataclasses (builder/settings.py, the stage
modules); an option left out keeps it. Option names are the settings' field names.
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
from d3mfmt.labels import ENCODINGS, VALUE_CODECS
from d3mfmt.render import DTYPE_NAMES
from d3mfmt.terminal import printable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# option -> the settings field it sets: a BuildSettings field, or "patches." / "inversion." + field
SETTINGS_OPTIONS = {
    "revision": "revision", "variant": "variant", "ipc": "ipc", "grid": "grid", "resolution": "resolution", "steps": "steps",
    "guidance_scale": "guidance_scale", "prompt_template": "prompt_template", "seed": "seed",
    "seed_candidates": "seed_candidates", "temperature": "temperature",
    "n_crops": "patches.n_crops", "max_images": "patches.max_images",
    "ti_steps": "inversion.steps", "ti_lr": "inversion.lr", "ti_batch": "inversion.batch",
    "n_vectors": "inversion.n_vectors",
}


def _default(target: str):
    """The dataclass default of a settings field (for help texts: the dataclass stays the one source)."""
    from .settings import BuildSettings

    cls = BuildSettings
    *sections, name = target.split(".")
    for section in sections:
        cls = next(f for f in dataclasses.fields(cls) if f.name == section).default_factory
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _help(text: str, option: str) -> str:
    return f"{text} [default: {_default(SETTINGS_OPTIONS[option])}]"


def _model_help(text: str, field_name: str) -> str:
    from .settings import describe

    return f"{text} [default: the model's; {describe(field_name)}]"


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
    from d3mfmt import LabelEncoding

    from .labeloptions import DENSE_VALUES

    default = LabelEncoding()
    for option in reversed([
        click.option("--label-kind", "--labels", "label_kind", type=click.Choice(list(ENCODINGS)),
                     help=f"Soft-label encoding [default: {default.kind}]."),
        click.option("--k", type=int,
                     help=f"Entries kept per label for topk [default: {default.k}, at most the class count]."),
        click.option("--values", type=click.Choice(list(VALUE_CODECS)),
                     help=f"Label value codec [default: {default.values} for topk, {DENSE_VALUES} for dense]."),
        click.option("--min-agreement", type=float,
                     help="Write no archive when the teacher agrees with a class on fewer regenerated patches than "
                          "this fraction, e.g. 0.5; checked once, on every class, when the archive is written "
                          "(a shard records its classes below it and goes on) [default: only warn]."),
    ]):
        f = option(f)
    return f


def _shard_help() -> str:
    from .settings import RunOptions

    i, n = RunOptions().shard
    return (f"Build only classes c with c % n == i, as i/n [default: {i}/{n}]; 'auto' reads RANK/WORLD_SIZE "
            "(torchrun, accelerate) or Slurm.")


@main.command("build")
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Archive to write.")
@click.option("--demo", is_flag=True, help="Built-in model, teacher and MNIST train split, with the model's defaults.")
@click.option("--model", help="Diffusion model: built-in id, diffusers folder or hub id (local cache). Required without --demo.")
@click.option("--revision", help="Hub revision of --model.")
@click.option("--variant", help="Weight-file variant of --model, e.g. fp16 (its *.fp16.safetensors) [default: the plain "
                                "weights, or the only variant the folder holds].")
@click.option("--teacher", help="Teacher: built-in name or module:function. Required without --demo.")
@click.option("--classes", "class_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Class list FILE: folder names (e.g. WordNet ids) in the teacher's logit order, one per line, "
                   "optional name after a tab or space [default: sorted folder names].")
@click.option("--ignore-class-order", is_flag=True,
              help="Build even if the teacher seems to take the classes in another order than the data.")
@click.option("--ipc", type=int, help=_help("Distilled images per class.", "ipc"))
@click.option("--grid", type=int, help=_help("Patches per side of each collage.", "grid"))
@click.option("--resolution", type=int, help=_model_help("Collage side in pixels.", "resolution"))
@click.option("--steps", type=int, help=_model_help("DDIM steps.", "steps"))
@click.option("--guidance-scale", "--guidance", "guidance_scale", type=float,
              help=_model_help("Classifier-free guidance scale.", "guidance_scale"))
@click.option("--prompt-template", "--template", "prompt_template",
              help=_model_help("Prompt template containing {token}.", "collage_template"))
@click.option("--n-vectors", "--vectors", "n_vectors", type=int, help=_help("Token vectors per class.", "n_vectors"))
@click.option("--ti-steps", type=int, help=_model_help("Textual-inversion steps per class.", "ti_steps"))
@click.option("--ti-lr", type=float, help=_model_help("Textual-inversion learning rate.", "ti_lr"))
@click.option("--ti-batch", type=int, help=_model_help("Textual-inversion batch size.", "ti_batch"))
@click.option("--n-crops", type=int, help=_help("Random crops scored per real image.", "n_crops"))
@click.option("--max-images", type=int, help=_help("Real images per class considered.", "max_images"))
@click.option("--seed", type=int, help=_help("Base seed.", "seed"))
@click.option("--seed-candidates", type=int, help=_help("Render M candidates per kept image.", "seed_candidates"))
@click.option("--temperature", type=float, help=_help("Teacher softmax temperature.", "temperature"))
@_label_options
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Checkpoints [default: OUT.work].")
@click.option("--shard", help=_shard_help())
@click.option("--device", help="cuda, cuda:N or cpu [default: cuda:LOCAL_RANK under a launcher, cuda if available].")
@click.option("--dtype", type=click.Choice(list(DTYPE_NAMES)),
              help="The frozen model's dtype for inversion and rendering; the labels are computed in it "
                   "[default: float16 on CUDA, float32 on the CPU].")
@click.option("--trust-render-cost", is_flag=True,
              help="Build settings whose render cost (steps, size, images) is over a default reader's bounds; "
                   "the archive's readers then need --trust-render-cost too.")
def build_command(**options) -> None:
    """Distil the ImageFolder DATA (or the built-in MNIST split with --demo) into the archive OUT."""
    from d3mfmt.renderable import UNBOUNDED

    from .labeloptions import check_requested_k, label_encoding
    from .pipeline import build_archive
    from .settings import DEMO_TEACHER, RunOptions
    from .shards import parse_shard
    from .teachers import load_teacher, mnist_test_accuracy

    with _errors():
        # 1. options onto the source, the settings, the label encoding and the run
        source, settings = _source_and_settings(options)
        labels = label_encoding(options["label_kind"], options["k"], options["values"], settings.temperature)
        check_requested_k(options["k"], len(source.classes))
        run = RunOptions(**_given(shard=None if options["shard"] is None else parse_shard(options["shard"]),
                                  device=options["device"], dtype=options["dtype"],
                                  min_agreement=options["min_agreement"]),
                         check_order=not options["ignore_class_order"],
                         render_limits=UNBOUNDED if options["trust_render_cost"] else None)
        # 2. build (the demo records its teacher's accuracy on the held-out digits)
        accuracy = mnist_test_accuracy(load_teacher(DEMO_TEACHER)) if options["demo"] else None
        result = build_archive(source, settings, options["out"], labels=labels, workdir=options["workdir"], run=run,
                               teacher_accuracy=accuracy)
    _report(result)


def _given(**values) -> dict:
    """Only what the user passed: everything else keeps the dataclass default."""
    return {key: value for key, value in values.items() if value is not None}


def _source_and_settings(options: dict):
    """(source, settings) for the demo, or for the user's data, model and teacher."""
    from .settings import BuildSettings, demo_settings
    from .classlist import read_class_list
    from .sources import ImageFolderSource, MnistSource

    named = {"DATA": options["data"], "--model": options["model"], "--teacher": options["teacher"]}
    if options["demo"]:
        clash = [flag for flag, v in {**named, "--revision": options["revision"], "--variant": options["variant"],
                                      "--classes": options["class_file"]}.items() if v is not None]
        if clash:
            raise D3MError(f"--demo uses the built-in MNIST data, model and teacher; drop {', '.join(clash)}")
        source, base = MnistSource("train"), demo_settings()
    else:
        missing = [flag for flag, v in named.items() if v is None]
        if missing:
            raise D3MError(
                f"a build on your own data needs {' and '.join(missing)} (e.g. DATA=/data/train "
                "--model stable-diffusion-v1-5/stable-diffusion-v1-5 --teacher my_module:make_teacher); "
                "--demo runs the built-in MNIST example")
        ids, names = read_class_list(options["class_file"]) if options["class_file"] else (None, None)
        source = ImageFolderSource(options["data"], ids, names)
        base = BuildSettings(model=options["model"], teacher=options["teacher"])
    values = {"": {}, "patches": {}, "inversion": {}}
    for option, target in SETTINGS_OPTIONS.items():
        if options[option] is not None:
            section, _, name = target.rpartition(".")
            values[section][name] = options[option]
    settings = dataclasses.replace(base, **values[""], patches=dataclasses.replace(base.patches, **values["patches"]),
                                   inversion=dataclasses.replace(base.inversion, **values["inversion"]))
    return source, settings


@main.command("merge")
@click.argument("workdirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Archive to write.")
@_label_options
def merge_command(workdirs, out, label_kind, k, values, min_agreement) -> None:
    """Write OUT from the finished work directories of every shard of one build (labels: as the build recorded)."""
    from .assemble import merge_archives
    from .labeloptions import check_requested_k, label_encoding
    from .workdir import Workdir

    with _errors():
        # the build's label options unless given (the temperature always comes from the build's record)
        given = (label_kind, k, values) != (None, None, None)
        labels = label_encoding(label_kind, k, values) if given else None
        if k is not None:
            check_requested_k(k, len(Workdir(workdirs[0], create=False).record()["classes"]))
        result = merge_archives(list(workdirs), out, labels=labels, min_agreement=min_agreement)
    _report(result)


def _report(result) -> None:
    """The summary on stderr; the archive's path (data) on stdout."""
    click.echo("\n".join(printable(line) for line in result.summary), err=True)
    if result.out is not None:
        click.echo(str(result.out))


@contextlib.contextmanager
def _errors():
    """D3MError -> one line on stderr, exit 1 (no traceback)."""
    try:
        yield
    except D3MError as exc:
        click.echo(printable(f"d3m-build: {exc}"), err=True)
        sys.exit(1)


if __name__ == "__main__":  # python -m builder.cli (torchrun -m builder.cli ...)
    main()
