"""Train a student from a .d3m archive and score it on held-out real images labelled in the archive's class order.

Usage:
    python examples/train_student.py mnist_ipc10.d3m                         # stored soft labels, MNIST test split
    python examples/train_student.py mnist_ipc10.d3m --protocol teacher      # online relabelling by the teacher
    python examples/train_student.py pets.d3m --eval pets/val --student resnet8
    python examples/train_student.py pets.d3m --eval pets/val --protocol teacher --teacher mymod:make_teacher

Protocols (examples/evaluation/protocols.py; docs/results.md, "Benchmark"):
  stored   the archive's stored soft labels, no augmentation, KD at T (D3M's regime; DD-Ranking's 'S');
  teacher  random resized crops, the teacher's soft labels on each crop, KD at T (RDED / SRe2L; 'M');
  hard     random resized crops, one-hot class labels, cross-entropy.

The budget is a number of optimisation steps (--steps), not epochs, so
datasets of different sizes get the same training: AdamW, cosine decay.

Held-out images (--eval DIR): an ImageFolder with one sub-folder per archive
class, named by the class id or its name (``d3m-inspect ARCHIVE`` lists them);
folders are matched by name, never by sorted order, and a mismatch is an
error. Without --eval only an archive of the built-in MNIST train split is
scored, on its held-out test split; any other archive needs --eval.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no notes about torchvision at import
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluation.protocols import PROTOCOLS, TrainConfig  # noqa: E402

from d3mfmt import D3MError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archive")
    ap.add_argument("--eval", help="ImageFolder of held-out images, one sub-folder per archive class (id or name) "
                                   "[default: the MNIST test split, for archives of the built-in MNIST only]")
    ap.add_argument("--protocol", choices=list(PROTOCOLS), default="stored")
    ap.add_argument("--teacher", help="with --protocol teacher: built-in name or module:function "
                                      "[default: the archive's teacher, if built-in]")
    ap.add_argument("--student", default="convnet3", help="convnet3, resnet8, mlp, vit, or module:function "
                                                          "returning an nn.Module(num_classes) [default: convnet3]")
    d = TrainConfig()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--cache-dir", help="pixel cache folder [default: $D3MFMT_CACHE_DIR or ~/.cache/d3mfmt]")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (they render and read the cache)")
    args = ap.parse_args(argv)
    if args.teacher and args.protocol != "teacher":
        ap.error("--teacher is used only by --protocol teacher")
    if args.steps < 1 or args.batch < 1:
        ap.error("--steps and --batch must be positive")
    return args


def teacher_for(args, manifest):
    """The teacher module for ``--protocol teacher`` (``--teacher``, else the archive's own built-in one)."""
    from evaluation.builder_adapter import BUILTIN_TEACHERS, resolve_teacher

    spec = args.teacher or manifest.teacher.name
    if args.teacher is None and spec not in BUILTIN_TEACHERS:
        raise D3MError(f"the archive's teacher {spec!r} is not built in; pass --teacher NAME or module:function")
    return resolve_teacher(spec)[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    from d3mfmt import D3MDataset
    from evaluation.heldout import heldout_for
    from evaluation.protocols import evaluate, train_student

    try:
        # 1. the archive and its held-out set, checked before any training
        dataset = D3MDataset(args.archive, cache_dir=args.cache_dir)  # renders on first use, then reads its cache
        manifest = dataset.archive.manifest
        heldout = heldout_for(manifest, args.eval, manifest.generator.height // manifest.dataset.grid)
        teacher = teacher_for(args, manifest) if args.protocol == "teacher" else None
        # 2. train through DataLoader(D3MDataset), score
        cfg = replace(TrainConfig(), steps=args.steps, batch=args.batch, lr=args.lr, temperature=args.temperature,
                      seed=args.seed)
        print(f"{len(dataset)} patches, protocol {args.protocol} ({PROTOCOLS[args.protocol].description}), "
              f"student {args.student}, {cfg.steps} steps of {cfg.batch}; held out: {heldout.description}",
              file=sys.stderr)
        model = train_student(dataset, args.protocol, args.student, cfg, teacher, num_workers=args.workers)
        acc = evaluate(model, heldout.images, heldout.labels)
    except D3MError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"held-out accuracy {100 * acc:.2f}%  protocol {args.protocol}  student {args.student}  "
          f"archive {args.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
