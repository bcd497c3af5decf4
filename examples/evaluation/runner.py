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
    render: object = None  # D3MDataset(render=...) for an archive (None: the reader's defaults)


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
    from d3mfmt import D3MDataset, RenderOptions

    from .baselines import RealSet
    from .builder_adapter import resolve_teacher
    from .heldout import builtin_mnist_heldout, heldout_for
    from .protocols import evaluate, train_student

    if job.teacher not in _STATE:
        _STATE[job.teacher] = resolve_teacher(job.teacher)[0]
    if job.kind == "archive":
        dataset = D3MDataset(job.path, cache_dir=job.cache_dir, render=job.render or RenderOptions())
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


def cached_accuracy(job: Job, results_dir: Path) -> float | None:
    f = results_dir / f"{job_key(job)}.json"
    return json.loads(f.read_text())["accuracy"] if f.is_file() else None


def store_accuracy(job: Job, acc: float, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    key = job_key(job)
    tmp = results_dir / f".{key}.tmp"
    tmp.write_text(json.dumps({"accuracy": acc, "job": {**asdict(job), "cfg": asdict(job.cfg)}}))
    os.replace(tmp, results_dir / f"{key}.json")


class Scheduler:
    """One pool of ``workers`` single-threaded processes for builds and student runs.

    Work waits in a priority queue here and enters the pool only when a worker
    is free: a build's follow-up runs (queued by ``then`` when it finishes)
    overtake queued runs of lower priority, so the headline rows come first.
    """

    def __init__(self, workers: int, results_dir: Path):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers, self.results_dir = max(1, workers), results_dir
        self.queue, self.running, self.accuracies = [], {}, {}
        self.start, self.trained, self.order = time.perf_counter(), 0, 0
        examples_dir = str(Path(__file__).resolve().parent.parent)
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=init_worker, initargs=(examples_dir,))

    def _push(self, priority, item, fn, args) -> None:
        import heapq

        self.order += 1
        heapq.heappush(self.queue, (priority, self.order, item, fn, args))

    def submit_jobs(self, jobs: list[Job], priority: int = 1) -> None:
        """Queue the runs whose accuracy is not cached yet (lower ``priority`` runs first)."""
        queued = {entry[2] for entry in self.queue} | set(self.running.values())
        for job in jobs:
            acc = cached_accuracy(job, self.results_dir)
            if acc is not None:
                self.accuracies[job] = acc
            elif job not in self.accuracies and job not in queued:
                self._push(priority, job, run_job, (job,))
                queued.add(job)

    def submit(self, fn, *args, then=None, priority: int = 0) -> None:
        """Queue ``fn(*args)`` for a worker; ``then(result)`` runs here when it is done."""
        self._push(priority, ("task", then), fn, args)

    def wait(self) -> dict:
        """Run everything queued (and what finished tasks queue); returns {job: accuracy}."""
        import heapq
        from concurrent.futures import FIRST_COMPLETED, wait

        while self.queue or self.running:
            while self.queue and len(self.running) < self.workers:
                _, _, item, fn, args = heapq.heappop(self.queue)
                self.running[self.pool.submit(fn, *args)] = item
            done, _ = wait(list(self.running), return_when=FIRST_COMPLETED)
            for future in done:
                item = self.running.pop(future)
                if isinstance(item, Job):
                    self._record(item, future.result())
                elif item[1] is not None:
                    item[1](future.result())
        self.pool.shutdown()
        return self.accuracies

    def _record(self, job: Job, acc: float) -> None:
        self.accuracies[job] = acc
        store_accuracy(job, acc, self.results_dir)
        self.trained += 1
        log.info("[run %d, %d queued, %.0fs] %s %s %s seed %d: %.4f", self.trained, len(self.queue),
                 time.perf_counter() - self.start, Path(job.path).name, job.protocol, job.student, job.seed, acc)
