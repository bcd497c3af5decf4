"""The benchmark's outputs: Markdown tables, the JSON of every row, the accuracy-vs-bytes plot."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .metrics import best_within, hard_label_recovery, improvement_over_random, label_robust_score, mean_std
from .protocols import PROTOCOLS
from .students import STUDENT_NAMES

METHOD_NAMES = {
    "d3m": ".d3m archive",
    "word": ".d3m, class word (`--ti-steps 0`)",
    "random": "random real",
    "rded": "real-patch collages (RDED-style)",
    "full": "full train split",
    "grid1": ".d3m, grid 1x1",
    "grid3": ".d3m, grid 3x3 (96 px, --trust-render-cost)",
    "single": ".d3m, single images (grid 1x1, 4x IPC)",
}
CURVES = ("d3m", "word", "random", "rded")  # the equal-storage methods


@dataclass(frozen=True)
class Row:
    method: str
    ipc: int | None  # None: the full split
    protocol: str
    student: str
    bytes: int
    seeds: tuple[int, ...]
    accs: tuple[float, ...]

    @property
    def mean(self) -> float:
        return mean_std(self.accs)[0]

    @property
    def std(self) -> float:
        return mean_std(self.accs)[1]

    def to_json(self) -> dict:
        return {**asdict(self), "mean": self.mean, "std": self.std}


def pm(values) -> str:
    """'mean ± std' in percent."""
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def find(rows, method, ipc, protocol, student="convnet3") -> Row | None:
    return next((r for r in rows if (r.method, r.ipc, r.protocol, r.student) == (method, ipc, protocol, student)), None)


def ipc_text(ipc) -> str:
    return "all" if ipc is None else str(ipc)


def cross_table(rows, plan) -> list[str]:
    students = ("convnet3", *plan.cross_students)
    lines = [f"| method (IPC {plan.cross_ipc}) | protocol | " + " | ".join(STUDENT_NAMES[s] for s in students) + " |",
             "|---|---|" + "---:|" * len(students)]
    for method in (*CURVES, "full"):
        for protocol in plan.cross_protocols:
            ipc = None if method == "full" else plan.cross_ipc
            cells = [find(rows, method, ipc, protocol, s) for s in students]
            if any(cells):
                lines.append(f"| {METHOD_NAMES[method]} | {protocol} | "
                             + " | ".join(pm(c.accs) if c else "" for c in cells) + " |")
    return lines


def storage_table(rows) -> list[str]:
    lines = ["| method | IPC | stored: bytes | stored | teacher, hard: bytes | teacher | hard |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r.method, r.ipc) for r in rows if r.method in (*CURVES, "full")},
                  key=lambda k: ((*CURVES, "full").index(k[0]), k[1] or 0))
    for method, ipc in keys:
        s, t, h = (find(rows, method, ipc, p) for p in ("stored", "teacher", "hard"))
        lines.append(f"| {METHOD_NAMES[method]} | {ipc_text(ipc)} | {f'{s.bytes:,}' if s else ''} | "
                     f"{pm(s.accs) if s else ''} | {f'{(t or h).bytes:,}' if t or h else ''} | "
                     f"{pm(t.accs) if t else ''} | {pm(h.accs) if h else ''} |")
    return lines


def budget_table(rows, budgets) -> tuple[list[str], list[dict]]:
    """Per (method, protocol), the best it reaches within each byte budget (ConvNet-3)."""
    lines = ["| method | protocol | " + " | ".join(f"≤ {b / 1000:g} KB" for b in budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    records = []
    for protocol in PROTOCOLS:
        for method in CURVES:
            mine = [r.to_json() for r in rows if (r.method, r.protocol, r.student) == (method, protocol, "convnet3")]
            if not mine:
                continue
            cells = []
            for budget in budgets:
                best = best_within(mine, budget)
                cells.append("—" if best is None else
                             f"{100 * best['mean']:.1f} ± {100 * best['std']:.1f} (IPC {best['ipc']}, {best['bytes']:,} B)")
                records.append({"budget": budget, "method": method, "protocol": protocol, "best": best})
            lines.append(f"| {METHOD_NAMES[method]} | {protocol} | " + " | ".join(cells) + " |")
    return lines, records


def ablation_table(rows, ipc) -> list[str]:
    lines = ["| archive (all from the demo build's settings) | IPC | patches per class | bytes (stored) | stored | teacher |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, k, grid in (("grid1", ipc, 1), ("d3m", ipc, 2), ("grid3", ipc, 3), ("single", 4 * ipc, 1)):
        s, t = find(rows, method, k, "stored"), find(rows, method, k, "teacher")
        if s and t:
            name = ".d3m, grid 2x2 (default)" if method == "d3m" else METHOD_NAMES[method]
            lines.append(f"| {name} | {k} | {k * grid * grid} | {s.bytes:,} | {pm(s.accs)} | {pm(t.accs)} |")
    for method in ("random", "rded"):
        s, t = find(rows, method, ipc, "stored"), find(rows, method, ipc, "teacher")
        if s and t:
            per = ipc * (4 if method == "rded" else 1)
            lines.append(f"| {METHOD_NAMES[method]} | {ipc} | {per} | {s.bytes:,} | {pm(s.accs)} | {pm(t.accs)} |")
    return lines


def ddranking(rows) -> tuple[list[str], list[dict]]:
    """HLR, IOR and LRS per distilled set and IPC (ConvNet-3), seed by seed, as fractions (mean ± std)."""
    lines = ["| method | IPC | HLR | IOR stored | IOR teacher | IOR hard | LRS stored | LRS teacher | LRS hard |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full = find(rows, "full", None, "hard")
    records = []
    for method in ("d3m", "word", "rded"):
        for ipc in sorted({r.ipc for r in rows if r.method == method}):
            syn_hard = find(rows, method, ipc, "hard")
            if full is None or syn_hard is None or len(set(map(len, (full.accs, syn_hard.accs)))) != 1:
                continue
            hlr = [hard_label_recovery(f, s) for f, s in zip(full.accs, syn_hard.accs)]
            ior, lrs = {}, {}
            for p in PROTOCOLS:
                syn, rdm = find(rows, method, ipc, p), find(rows, "random", ipc, p)
                if syn and rdm and len(syn.accs) == len(rdm.accs) == len(hlr):
                    ior[p] = [improvement_over_random(a, b) for a, b in zip(syn.accs, rdm.accs)]
                    lrs[p] = [label_robust_score(h, i) for h, i in zip(hlr, ior[p])]
            if not ior:
                continue
            cell = lambda v: "" if v is None else "{:.3f} ± {:.3f}".format(*mean_std(v))  # noqa: E731
            lines.append(f"| {METHOD_NAMES[method]} | {ipc} | {cell(hlr)} | "
                         + " | ".join(cell(ior.get(p)) for p in PROTOCOLS) + " | "
                         + " | ".join(cell(lrs.get(p)) for p in PROTOCOLS) + " |")
            records.append({"method": method, "ipc": ipc, "hlr": hlr, "ior": ior, "lrs": lrs})
    return lines, records


def write_report(rows, plan, cfg, storage: dict, seconds: dict, out: Path, command: str, incomplete=()) -> None:
    """OUT/benchmark.md, OUT/benchmark.json and OUT/benchmark.png (``incomplete``: rows left out, a seed missing)."""
    budget_lines, budget_records = budget_table(rows, plan.budgets)
    dd_lines, dd_records = ddranking(rows)
    md = [f"Command: `{command}`; {cfg.steps} steps of batch {cfg.batch}, seeds {list(plan.seeds)}, "
          f"accuracy % on the held-out digits (mean ± std); "
          + ("tables from the cached results." if seconds["report_only"] else f"wall time {seconds['total']} s."), "",
          "Cross-architecture:", "", *cross_table(rows, plan), "",
          "Equal storage, ConvNet-3 (bytes as stored: archive file, or PNG files + label file):", "",
          *storage_table(rows), "", "Best within a byte budget (ConvNet-3):", "", *budget_lines, "",
          f"Ablations at IPC {plan.ablation_ipc} (ConvNet-3):", "", *ablation_table(rows, plan.ablation_ipc), "",
          "DD-Ranking (ConvNet-3; fractions; random real at the same IPC and protocol; full split, hard):", "",
          *dd_lines, "",
          f"Once per consumer: the generator {storage['generator']} is {storage['generator_bytes']:,} bytes of files; "
          f"the `teacher` protocol also needs the teacher {storage['teacher']} ({storage['teacher_bytes']:,} bytes)."]
    if incomplete:
        md += ["", "Left out of every table (a seed not trained yet): " + "; ".join(
            f"{r.method} IPC {r.ipc} {r.protocol} {r.student} ({len(r.seeds)} of {len(plan.seeds)} seeds)"
            for r in incomplete) + "."]
    (out / "benchmark.md").write_text("\n".join(md) + "\n")
    doc = {"command": command, "plan": asdict(plan), "train": asdict(cfg), "seconds": seconds, "storage": storage,
           "rows": [r.to_json() for r in rows], "incomplete": [r.to_json() for r in incomplete],
           "budgets": budget_records, "ddranking": dd_records}
    (out / "benchmark.json").write_text(json.dumps(doc, indent=1))
    plot(rows, out / "benchmark.png")


def plot(rows, path: Path) -> None:
    """Accuracy against bytes (log x), one panel per protocol, one curve per method (ConvNet-3)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, protocol in zip(axes, PROTOCOLS):
        for method in CURVES:
            pts = sorted((r for r in rows if (r.method, r.protocol, r.student) == (method, protocol, "convnet3")),
                         key=lambda r: r.bytes)
            if pts:
                ax.errorbar([r.bytes for r in pts], [100 * r.mean for r in pts], yerr=[100 * r.std for r in pts],
                            marker="o", capsize=3, label=METHOD_NAMES[method].replace("`", ""))
                for r in pts:
                    ax.annotate(str(r.ipc), (r.bytes, 100 * r.mean), textcoords="offset points", xytext=(4, -10),
                                fontsize=7)
        full = find(rows, "full", None, protocol)
        if full:
            ax.errorbar([full.bytes], [100 * full.mean], yerr=[100 * full.std], marker="*", markersize=10,
                        color="black", label="full train split")
        ax.set_xscale("log")
        ax.set_title(f"protocol {protocol}")
        ax.set_xlabel("bytes stored (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%), ConvNet-3")
    legend = {}  # every panel's curves in one legend (the full split has no stored-label row)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[0].legend(legend.values(), legend.keys(), fontsize=7, loc="lower right")
    fig.suptitle("MNIST: student accuracy against storage (numbers: IPC)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
