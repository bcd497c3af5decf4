"""Student runs as independent jobs: in this process or in a pool of single-threaded worker processes.

A job names its data by file (an archive, read through ``D3MDataset``, or a
real-image set's ``.npz``), so workers share nothing but the file system. Each
finished job's accuracy is kept in ``RESULTS/<key>.json``; the key covers the
data file's sha256, the protocol, the student, the seed and the recipe, so a
rerun trains only what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

log = logging.getLogger("benchmark")


@dataclass(frozen=True)
class Job:
    kind: str  # "archive" or "real"
    path: str  # the .d3m file or the RealSet .npz
    protocol: str
    student: str
    seed: int
    cfg: object  # protocols.TrainConfig (seed replaced by ``seed``)
    cache_dir: str  # D3MDataset pixel cache
    teacher: str = "mnist-cnn"


def file_digest(path: str | Path, _memo: dict = {}) -> str:  # noqa: B006 - a per-process memo by design
    """sha256 of a file's bytes (memoised per process: the files do not change during a run)."""
    key = str(path)
    if key not in _memo:
        _memo[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _memo[key]


def job_key(job: Job) -> str:
    parts = {"data": file_digest(job.path), "protocol": job.protocol, "student": job.student, "seed": job.seed,
             "cfg": asdict(job.cfg), "teacher": job.teacher}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


_STATE: dict = {}  # per process: held-out sets by side, teachers by name


def init_worker(examples_dir: str) -> None:
    """Pool initializer: import path, one intra-op thread per worker (parallelism comes from the processes)."""
    import torch

    if examples_dir not in sys.path:
        sys.path.insert(0, examples_dir)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("d3m-build").setLevel(logging.WARNING)  # per-class build notes; warnings still show
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_job(job: Job) -> float:
    """Train one student and return its held-out accuracy (a fraction)."""
    from d3mfmt import D3MDataset

    from .baselines import RealSet
    from .builder_adapter import resolve_teacher
    from .heldout import builtin_mnist_heldout, heldout_for
    from .protocols import evaluate, train_student

    if job.teacher not in _STATE:
        _STATE[job.teacher] = resolve_teacher(job.teacher)[0]
    if job.kind == "archive":
        dataset = D3MDataset(job.path, cache_dir=job.cache_dir)
        manifest = dataset.archive.manifest
        side = manifest.generator.height // manifest.dataset.grid
    else:
        dataset, manifest, side = RealSet.load(Path(job.path)).dataset(), None, 32
    key = ("heldout", job.path if manifest is not None else side)  # real sets: the MNIST split by construction
    if key not in _STATE:
        _STATE[key] = builtin_mnist_heldout(side) if manifest is None else heldout_for(manifest, None, side)
    heldout = _STATE[key]
    model = train_student(dataset, job.protocol, job.student, replace(job.cfg, seed=job.seed), _STATE[job.teacher])
    return evaluate(model, heldout.images, heldout.labels)


def run_jobs(jobs: list[Job], results_dir: Path, workers: int = 1) -> list[float]:
    """Accuracies of ``jobs`` (same order): cached ones are read, the rest trained, ``workers`` at a time."""
    results_dir.mkdir(parents=True, exist_ok=True)
    keys = [job_key(j) for j in jobs]
    out: dict[int, float] = {}
    todo = []
    for i, key in enumerate(keys):
        f = results_dir / f"{key}.json"
        if f.is_file():
            out[i] = json.loads(f.read_text())["accuracy"]
        else:
            todo.append(i)
    log.info("%d student runs: %d cached, %d to train on %d worker(s)", len(jobs), len(jobs) - len(todo), len(todo),
             workers)
    start = time.perf_counter()

    def done(i: int, acc: float) -> None:
        out[i] = acc
        tmp = results_dir / f".{keys[i]}.tmp"
        tmp.write_text(json.dumps({"accuracy": acc, "job": {**asdict(jobs[i]), "cfg": asdict(jobs[i].cfg)}}))
        os.replace(tmp, results_dir / f"{keys[i]}.json")
        j = jobs[i]
        log.info("[%d/%d %.0fs] %s %s %s seed %d: %.4f", len(out), len(jobs), time.perf_counter() - start,
                 Path(j.path).name, j.protocol, j.student, j.seed, acc)

    if workers <= 1:
        for i in todo:
            done(i, run_job(jobs[i]))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        examples_dir = str(Path(__file__).resolve().parent.parent)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                                 initargs=(examples_dir,)) as pool:
            futures = {pool.submit(run_job, jobs[i]): i for i in todo}
            for future in as_completed(futures):
                done(futures[future], future.result())
    return [out[i] for i in range(len(jobs))]
