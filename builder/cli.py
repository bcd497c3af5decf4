"""``d3m-build``: real images -> .d3m archive. Parses arguments and calls builder.build.

Examples:
    d3m-build --demo -o mnist_ipc10.d3m
    d3m-build /data/imagenet100/train -o in100_ipc10.d3m --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --teacher my_teachers:resnet18_in100 --classes classes.txt --ipc 10 --grid 2
    d3m-build ... --workdir wd --shard 0/4      # one of four shards (any launcher)
    d3m-build --merge wd -o out.d3m             # join the finished shards
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import click

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Archive to write.")
@click.option("--demo", is_flag=True, help="Built-in model, teacher and MNIST train split with the measured defaults.")
@click.option("--model", default="d3m/tiny-mnist", show_default=True, help="Built-in id, folder or hub id (local cache).")
@click.option("--revision", help="Hub revision of --model.")
@click.option("--teacher", default="mnist-cnn", show_default=True, help="Built-in teacher or module:function.")
@click.option("--classes", "class_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Class folder names (e.g. WordNet ids) in archive order, one per line, optional name after a space.")
@click.option("--ipc", type=int, default=10, show_default=True, help="Distilled images per class.")
@click.option("--grid", type=int, default=2, show_default=True, help="Patches per side of each collage.")
@click.option("--resolution", type=int, help="Collage side in pixels [default: the model's].")
@click.option("--steps", type=int, help="DDIM steps [default: the model's].")
@click.option("--guidance", type=float, help="Classifier-free guidance [default: the model's].")
@click.option("--template", help="Prompt template containing {token}.")
@click.option("--vectors", type=int, default=1, show_default=True, help="Token vectors per class.")
@click.option("--ti-steps", type=int, default=100, show_default=True, help="Textual-inversion steps per class.")
@click.option("--ti-lr", type=float, default=5e-4, show_default=True, help="Textual-inversion learning rate.")
@click.option("--ti-batch", type=int, default=16, show_default=True, help="Textual-inversion batch size.")
@click.option("--n-crops", type=int, default=5, show_default=True, help="Random crops scored per real image.")
@click.option("--max-images", type=int, default=300, show_default=True, help="Real images per class considered.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seed-candidates", type=int, default=1, show_default=True, help="Render M candidates per kept image.")
@click.option("--labels", "label_kind", type=click.Choice(["topk", "dense", "hard"]), default="topk", show_default=True)
@click.option("--k", type=int, default=5, show_default=True, help="Entries per label for topk.")
@click.option("--values", type=click.Choice(["u8sqrt", "u8", "f16", "f32"]), default=None,
              help="Label value codec [default: u8sqrt for topk, f16 for dense].")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Teacher softmax temperature.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Checkpoints [default: OUT.work].")
@click.option("--shard", default="0/1", show_default=True,
              help="Build only classes c with c % n == i; 'auto' reads RANK/WORLD_SIZE (torchrun, accelerate) or Slurm.")
@click.option("--merge", "merge_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Write OUT from finished work directories (repeatable); builds nothing.")
@click.option("--device", help="cuda or cpu [default: cuda if available].")
def main(data, out, demo, model, revision, teacher, class_file, ipc, grid, resolution, steps, guidance, template,
         vectors, ti_steps, ti_lr, ti_batch, n_crops, max_images, seed, seed_candidates, label_kind, k, values,
         temperature, workdir, shard, merge_dirs, device) -> None:
    """Distil the ImageFolder DATA (or the built-in MNIST split with --demo) into a .d3m archive."""
    args = dict(locals())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from d3mfmt import D3MError

    try:
        run(**args)
    except D3MError as exc:
        click.echo(f"d3m-build: {exc}", err=True)
        sys.exit(1)


def run(data, out, demo, model, revision, teacher, class_file, ipc, grid, resolution, steps, guidance, template,
        vectors, ti_steps, ti_lr, ti_batch, n_crops, max_images, seed, seed_candidates, label_kind, k, values,
        temperature, workdir, shard, merge_dirs, device) -> None:
    from d3mfmt import D3MError, LabelEncoding

    from .build import BuildSettings, InversionSettings, PatchSettings, build, fit_labels, parse_shard, write_archive
    from .sources import ImageFolderSource, MnistSource, read_class_list

    labels = LabelEncoding(label_kind, None if label_kind == "dense" else (1 if label_kind == "hard" else k),
                           None if label_kind == "hard" else (values or ("f16" if label_kind == "dense" else "u8sqrt")),
                           temperature)
    if not out.parent.is_dir():
        raise D3MError(f"-o {out}: the folder {out.parent} does not exist; create it first")
    name = out.name.removesuffix(".d3m")
    # merge mode: no building
    if merge_dirs:
        archive = write_archive(list(merge_dirs), out, labels, name)
        click.echo(f"wrote {out} ({out.stat().st_size:,} bytes, {archive.manifest.dataset.num_classes} classes)")
        return
    # 1. data source
    if demo:
        if data is not None:
            raise D3MError("--demo uses the built-in MNIST split; do not pass DATA as well")
        source = MnistSource("train")
    elif data is None:
        raise D3MError("pass DATA (an ImageFolder directory) or --demo")
    else:
        ids, names = read_class_list(class_file) if class_file else (None, None)
        source = ImageFolderSource(data, ids, names)
    settings = BuildSettings(
        model=model, revision=revision, teacher=teacher, ipc=ipc, grid=grid, resolution=resolution, steps=steps,
        guidance_scale=guidance, prompt_template=template, seed=seed, seed_candidates=seed_candidates,
        temperature=temperature,
        patches=PatchSettings(n_crops=n_crops, max_images=max_images),
        inversion=InversionSettings(steps=ti_steps, lr=ti_lr, batch=ti_batch, n_vectors=vectors),
    )
    fit_labels(labels, len(source.classes), temperature)  # a bad label option fails now, not after the build
    i, n = parse_shard(shard)
    workdir = workdir or out.with_name(out.name + ".work")
    # 2. build this shard's classes
    start = time.perf_counter()
    wd = build(source, settings, workdir, shard=(i, n), device=device)
    if n > 1:
        click.echo(f"shard {i}/{n} done in {time.perf_counter() - start:.0f}s; "
                   f"when every shard is done: d3m-build --merge {workdir} -o {out}")
        return
    # 3. write the archive and summarise
    accuracy = demo_teacher_accuracy(teacher) if demo else None
    archive = write_archive([wd.path], out, labels, name, teacher_accuracy=accuracy)
    summarize(wd, out, archive, time.perf_counter() - start)


def demo_teacher_accuracy(teacher_name: str) -> float | None:
    """The built-in teacher's accuracy on the held-out MNIST split."""
    import torch

    from d3mfmt.mnist import load_mnist

    from .teacher_spec import resolve_teacher

    model, _ = resolve_teacher(teacher_name)
    x, y = load_mnist("test")
    images = torch.nn.functional.pad(torch.from_numpy(x).float().div(255), (2, 2, 2, 2))[:, None]
    with torch.no_grad():
        pred = model(images).argmax(1).numpy()
    return round(float((pred == y).mean()), 4)


def summarize(wd, out: Path, archive, seconds: float) -> None:
    """Closing summary on stderr: time per stage, bytes per member, agreement on regenerated patches."""
    import numpy as np

    from d3mfmt.container import read_zip

    metas = [wd.load_class(c)[1] for c in range(archive.manifest.dataset.num_classes)]
    stages = {k: sum(m["seconds"][k] for m in metas) for k in metas[0]["seconds"]}
    lines = [f"built {out} in {seconds:.0f}s (this run; resumed classes excluded)"]
    lines += [f"  stage {k:<8}{v:8.1f}s" for k, v in stages.items()]
    for member, payload in read_zip(out.read_bytes()).items():
        lines.append(f"  {member:<22}{len(payload):>10,} bytes")
    lines.append(f"  file                  {out.stat().st_size:>10,} bytes")
    lines.append(f"  teacher top-1 = class on regenerated patches: {100 * np.mean([m['accuracy'] for m in metas]):.1f}%")
    click.echo("\n".join(lines), err=True)
