"""What a kilobyte of archive buys: students, protocols, baselines and storage on the built-in MNIST data.

Usage:
    python examples/benchmark.py                  # the full run (docs/results.md, "Benchmark")
    python examples/benchmark.py --quick          # every table and plot at toy sizes (<= 10 min on two cores)
    python examples/benchmark.py --out DIR --jobs 2
    python examples/benchmark.py --no-build       # retrain / finish the runs on the archives already built
    python examples/benchmark.py --report-only    # the tables from what OUT holds, nothing trained

Everything is trained with one recipe (examples/evaluation/protocols.py:
AdamW lr 2e-3, wd 0.01, cosine, batch 64, KD T = 4, a fixed number of steps)
and scored on the 1,000 held-out MNIST digits, 3 student seeds:

- methods: the .d3m archive (built-in model and teacher, the demo defaults),
  the class-word archive (``--ti-steps 0``), random real digits, RDED-style
  real-patch collages, the full train split;
- protocols: ``stored`` (stored soft labels, no augmentation), ``teacher``
  (random resized crops relabelled by the teacher), ``hard`` (crops, one-hot);
- students: ConvNet-3 everywhere; ResNet-8, MLP and ViT at the cross-architecture IPC;
- ablations: grid 1x1 / 2x2 / 3x3, single images vs collages;
- DD-Ranking's HLR, IOR and LRS from those rows.

Bytes are what a user stores: the archive file (with one-hot labels for the
protocols that read no stored label), or PNG files plus a label file.

Builds, real-image sets and every student's accuracy are cached under OUT
(``builds/``, ``real/``, ``results/``): a rerun trains only what changed, and a
changed build default (a new settings hash) builds anew. Writes
OUT/benchmark.md, OUT/benchmark.json and OUT/benchmark.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluation import builder_adapter as builder  # noqa: E402
from evaluation.baselines import RealSet, full_split, random_real, real_patch_collages  # noqa: E402
from evaluation.builds import ArchiveSpec, build_one, existing  # noqa: E402
from evaluation.protocols import TrainConfig  # noqa: E402
from evaluation.report import Row, write_report  # noqa: E402
from evaluation.runner import Job, Scheduler, cached_accuracy  # noqa: E402

log = logging.getLogger("benchmark")
ALL_PROTOCOLS = ("stored", "teacher", "hard")


@dataclass(frozen=True)
class Plan:
    """What one run measures (the full run and the quick run differ only here)."""

    archive_ipcs: tuple[int, ...]  # the .d3m archive (inverted tokens)
    word_ipcs: tuple[int, ...]  # the class-word archive (--ti-steps 0)
    real_ipcs: tuple[int, ...]  # random real subsets
    rded_ipcs: tuple[int, ...]  # real-patch collages
    cross_ipc: int  # IPC of the cross-architecture table
    cross_students: tuple[str, ...]
    cross_protocols: tuple[str, ...]
    ablation_ipc: int  # grid and single-image ablations
    seeds: tuple[int, ...]
    steps: int
    ti_steps: int | None = None  # None: the built-in model's default inversion
    ti_batch: int | None = None
    budgets: tuple[int, ...] = (5_000, 10_000, 30_000, 100_000)


FULL = Plan(archive_ipcs=(1, 10, 50, 100), word_ipcs=(1, 10, 50), real_ipcs=(1, 2, 5, 10, 50), rded_ipcs=(1, 10, 50),
            cross_ipc=10, cross_students=("resnet8", "mlp", "vit"), cross_protocols=("stored", "teacher"), ablation_ipc=10,
            seeds=(0, 1, 2), steps=300)
QUICK = Plan(archive_ipcs=(1, 2), word_ipcs=(1,), real_ipcs=(1, 2), rded_ipcs=(1,), cross_ipc=1,
             cross_students=("resnet8", "mlp", "vit"), cross_protocols=("stored",), ablation_ipc=1, seeds=(0, 1),
             steps=20, ti_steps=4, ti_batch=4, budgets=(3_000, 5_000, 10_000, 1_500_000))


@dataclass(frozen=True)
class Entry:
    """One training set: its file, what it is, and what storing it costs (soft labels / class labels only)."""

    method: str
    ipc: int | None  # None: the full split
    kind: str  # "archive" or "real"
    path: str
    bytes_soft: int
    bytes_hard: int
    seed: int | None = None  # a random subset drawn for this student seed only
    render: object = None  # an archive's D3MDataset(render=...) (ArchiveSpec.render)


def archive_specs(plan: Plan) -> list[ArchiveSpec]:
    """Every archive, in the order they are built: the headline IPC first, ablations last."""
    inv = dict(ti_steps=plan.ti_steps, ti_batch=plan.ti_batch)
    a, head = plan.ablation_ipc, plan.cross_ipc
    specs = [ArchiveSpec("d3m", head, **inv), ArchiveSpec("word", head, ti_steps=0)]
    specs += [ArchiveSpec("d3m", k, **inv) for k in sorted(plan.archive_ipcs, reverse=True)]
    specs += [ArchiveSpec("word", k, ti_steps=0) for k in sorted(plan.word_ipcs, reverse=True)]
    specs += [ArchiveSpec("d3m", a, **inv), ArchiveSpec("grid1", a, grid=1, **inv),
              ArchiveSpec("single", 4 * a, grid=1, **inv),
              # 3x3 of the 32-px patch: 96 px, over a default reader's render bound for the built-in model
              ArchiveSpec("grid3", a, grid=3, resolution=96, trust_render_cost=True, **inv)]
    return list(dict.fromkeys(specs))


def real_entries(plan: Plan, out: Path, teacher) -> list[Entry]:
    """Random subsets (one per student seed), real-patch collages and the full split, cached as .npz."""
    folder = out / "real"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [("random", k, s) for k in plan.real_ipcs for s in plan.seeds]
    wanted += [("rded", k, None) for k in plan.rded_ipcs] + [("full", None, None)]
    entries = []
    for method, ipc, seed in wanted:
        path = folder / f"{method}-ipc{ipc}-seed{seed}.npz"
        if not path.is_file():
            t0 = time.perf_counter()
            data = random_real(ipc, seed, teacher) if method == "random" else \
                real_patch_collages(ipc, 0, teacher) if method == "rded" else full_split(teacher)
            data.save(path)
            log.info("%s: %d images in %.0fs", path.name, len(data.labels), time.perf_counter() - t0)
        data = RealSet.load(path)
        entries.append(Entry(method, ipc, "real", str(path), data.image_bytes + data.soft_label_bytes,
                             data.image_bytes + data.hard_label_bytes, seed))
    return entries


def plan_jobs(plan: Plan, entries: list[Entry], cfg: TrainConfig, cache_dir: Path) -> list[tuple[Entry, Job]]:
    """Which (training set, protocol, student, seed) runs the tables need, each once."""
    def runs(entry, protocols, students):
        seeds = plan.seeds if entry.seed is None else (entry.seed,)
        protocols = [p for p in protocols if not (entry.method == "full" and p == "stored")]
        return [(entry, Job(entry.kind, entry.path, p, st, s, cfg, str(cache_dir), render=entry.render))
                for p in protocols for st in students for s in seeds]

    main = {"d3m", "word", "random", "rded", "full"}
    pairs = []
    for e in entries:
        if e.method in main:
            pairs += runs(e, ALL_PROTOCOLS, ("convnet3",))
            if e.ipc == plan.cross_ipc or e.method == "full":
                pairs += runs(e, plan.cross_protocols, plan.cross_students)
        else:  # ablations
            pairs += runs(e, ("stored", "teacher"), ("convnet3",))
    unique = {}
    for entry, job in pairs:
        unique.setdefault((job.path, job.protocol, job.student, job.seed), (entry, job))
    return list(unique.values())


def collect_rows(pairs: list[tuple[Entry, Job]], accs: list[float]) -> list[Row]:
    """Mean ± std over seeds per (method, IPC, protocol, student); bytes as stored for that protocol."""
    groups: dict[tuple, list] = {}
    for (entry, job), acc in zip(pairs, accs):
        groups.setdefault((entry.method, entry.ipc, job.protocol, job.student), []).append((entry, job.seed, acc))
    rows = []
    for (method, ipc, protocol, student), items in groups.items():
        items.sort(key=lambda item: item[1])  # by seed, so metrics can pair rows seed by seed
        sizes = [e.bytes_soft if protocol == "stored" else e.bytes_hard for e, _, _ in items]
        rows.append(Row(method, ipc, protocol, student, round(sum(sizes) / len(sizes)),
                        tuple(s for _, s, _ in items), tuple(a for _, _, a in items)))
    return rows


def run_everything(plan: Plan, out: Path, cfg: TrainConfig, workers: int, build: bool = True) -> list[tuple[Entry, Job]]:
    """Build, prepare and train what the plan needs: one build at a time (it goes first when a worker frees),
    runs in the other workers: a finished archive's ConvNet-3 runs, then the real sets', then the other students."""
    cache_dir, results = out / "pixels", out / "results"
    sched = Scheduler(workers, results)
    specs, pairs = archive_specs(plan), []

    def archive_ready(spec: ArchiveSpec):
        def then(built: dict) -> None:
            entry = Entry(spec.method, spec.ipc, "archive", built["path"], built["bytes_soft"], built["bytes_hard"],
                          render=spec.render())
            new = plan_jobs(plan, [entry], cfg, cache_dir)
            pairs.extend(new)
            for student_first in (True, False):  # ConvNet-3 runs of a finished archive come before everything else
                sched.submit_jobs([j for _, j in new if (j.student == "convnet3") == student_first],
                                  priority=1 if student_first else 3)
            if specs:  # the next build
                nxt = specs.pop(0)
                sched.submit(build_one, nxt, out, cache_dir, then=archive_ready(nxt))
        return then

    # 1. the first build; each finished build queues its runs and the next build (--no-build: the built ones)
    if build:
        first = specs.pop(0)
        sched.submit(build_one, first, out, cache_dir, then=archive_ready(first))
    else:
        for spec in [specs.pop(0) for _ in range(len(specs))]:
            if (built := existing(spec, out)) is not None:
                archive_ready(spec)(built)
    # 2. meanwhile, here: the real-image sets; their runs fill the other workers (ConvNet-3 first)
    real = plan_jobs(plan, real_entries(plan, out, builder.load_teacher("mnist-cnn")), cfg, cache_dir)
    real.sort(key=lambda p: real_rank(p[0], plan.cross_ipc))
    pairs.extend(real)
    for student_first in (True, False):
        sched.submit_jobs([j for _, j in real if (j.student == "convnet3") == student_first],
                          priority=2 if student_first else 4)
    sched.wait()
    return pairs


def real_rank(entry: Entry, head: int) -> int:
    """Real-set runs in the order the tables need them: subsets up to the headline IPC, the full split (HLR),
    the headline collages, then the rest."""
    if entry.method == "random":
        return 0 if entry.ipc <= head else 3
    return 1 if entry.method == "full" else 2 if entry.ipc == head else 4


def cached_pairs(plan: Plan, out: Path, cfg: TrainConfig) -> list[tuple[Entry, Job]]:
    """--report-only: the planned runs whose data and accuracy are already under OUT."""
    entries = [Entry(s.method, s.ipc, "archive", b["path"], b["bytes_soft"], b["bytes_hard"], render=s.render())
               for s in archive_specs(plan) if (b := existing(s, out)) is not None]
    entries += real_entries(plan, out, builder.load_teacher("mnist-cnn"))
    return [p for p in plan_jobs(plan, entries, cfg, out / "pixels") if cached_accuracy(p[1], out / "results") is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes: every table and plot in minutes")
    ap.add_argument("--out", type=Path, help="cache and outputs [default: bench_out, or bench_out_quick]")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes, one thread each [default: 2 (or the CPU count if lower)]")
    ap.add_argument("--no-build", action="store_true",
                    help="train and report with the archives OUT already holds; build nothing")
    ap.add_argument("--report-only", action="store_true",
                    help="write the tables from what OUT already holds (rows with every seed), build and train nothing")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or Path("bench_out_quick" if args.quick else "bench_out")
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("d3m-build").setLevel(logging.WARNING)
    start = time.perf_counter()
    cfg = TrainConfig(steps=plan.steps)
    pairs = cached_pairs(plan, out, cfg) if args.report_only else \
        run_everything(plan, out, cfg, args.jobs, build=not args.no_build)
    accs = [cached_accuracy(job, out / "results") for _, job in pairs]
    rows, incomplete = [], []  # a row lacking a seed stays out of every table, and is named
    for r in collect_rows(pairs, accs):
        (rows if len(r.seeds) == len(plan.seeds) else incomplete).append(r)
    for r in incomplete:
        log.warning("left out of the tables: %s IPC %s %s %s has %d of %d seeds", r.method, r.ipc, r.protocol,
                    r.student, len(r.seeds), len(plan.seeds))
    seconds = {"total": round(time.perf_counter() - start), "report_only": args.report_only}
    command = " ".join(["python", "examples/benchmark.py", *sys.argv[1:]])
    write_report(rows, plan, cfg, storage_notes(), seconds, out, command, incomplete=incomplete)
    print((out / "benchmark.md").read_text())
    log.info("total %.0fs", time.perf_counter() - start)


def storage_notes() -> dict:
    """What a consumer needs once besides the archive: the generator's files, and the teacher for 'teacher'."""
    from d3mfmt.models import resolve_model

    model = resolve_model(builder.DEMO_MODEL)
    return {"generator": builder.DEMO_MODEL, "generator_bytes": sum(f.stat().st_size for f in model.rglob("*") if f.is_file()),
            "teacher": "mnist-cnn", "teacher_bytes": builder.teacher_weights_bytes("mnist-cnn")}


if __name__ == "__main__":
    main()
