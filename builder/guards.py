"""The build's two semantic guards: class order and model domain.

1. **Class order.** Before any class is built, the teacher classifies a sample
   of every class's real images. If the teacher takes some class folder
   mostly for another class (its logits are in another order than the
   folders: the field's most common silent failure), the build stops and
   writes the class list that maximises agreement (an optimal assignment of
   folders to logits) for the user to pass back with ``--classes``.
2. **Model domain.** After a class is regenerated, the teacher's agreement
   with the class on regenerated patches is compared with its agreement on the
   selected real patches. Far below (d3mfmt.agreement.low_agreement) means the model does not render this
   class the way the teacher sees it; the archive would train poorly. When every class is done, a class is
   also low when its *precision* is: over half of the regenerated patches (of every class) the teacher takes
   for it are other classes' (the teacher's predictions pile up on it), and an archive whose overall
   agreement is near chance (d3mfmt.agreement.near_chance) is flagged. Before each class's inversion, a few
   renders of the class name warn early (:func:`early_domain_check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d3mfmt import ClassInfo, D3MError
from d3mfmt.agreement import LOW_PRECISION, low_agreement, near_chance, near_chance_limit
from d3mfmt.files import write_atomic

ORDER_SAMPLE = 32  # real images per class the class-order check classifies
ORDER_MISMATCH = 0.5  # a class is misordered when over half its images go to one other class d, the best
# reordering maps it to d, and class d's own images are not mostly taken for d (so d's logit is "free")


@torch.no_grad()
def confusion_row(teacher, images: torch.Tensor, num_classes: int, device: str) -> np.ndarray:
    """``[C]`` counts of the teacher's top-1 over one class folder's sample ``images``."""
    pred = teacher(images.to(device)).argmax(1).cpu().numpy()
    return np.bincount(pred, minlength=num_classes)[:num_classes]


def teacher_confusion(source, teacher, side: int, device: str, per_class: int = ORDER_SAMPLE) -> np.ndarray:
    """``[C, C]`` counts: row = class folder, column = the teacher's top-1 on its first ``per_class`` images.

    (A build computes it once, in its preflight, from the images it decodes there anyway.)
    """
    c_total = len(source.classes)
    return np.stack([confusion_row(teacher, source.images(c, side=side, limit=per_class), c_total, device)
                     for c in range(c_total)]).astype(np.int64)


def best_assignment(score: np.ndarray) -> np.ndarray:
    """``perm`` maximising ``sum(score[c, perm[c]])`` over permutations (Hungarian, O(C^3) worst case).

    Shortest augmenting paths with potentials (Jonker-Volgenant); the inner
    scan is vectorised, and near-diagonal matrices need short paths.
    """
    cost = -np.asarray(score, dtype=np.float64)
    n = cost.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)  # owner[j]: row (1-based) assigned to column j
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            cols = np.nonzero(used)[0]
            u[owner[cols]] += delta
            v[cols] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    perm = np.empty(n, dtype=np.int64)
    perm[owner[1:] - 1] = np.arange(n)
    return perm


@dataclass(frozen=True)
class OrderReport:
    """What the class-order check found."""

    counts: np.ndarray  # [C, C] teacher top-1 counts per class folder
    perm: np.ndarray  # folder c -> the logit it best matches

    @property
    def agreement(self) -> np.ndarray:
        return np.diag(self.counts) / np.maximum(self.counts.sum(1), 1)

    @property
    def gain(self) -> float:
        """Overall agreement after the best reordering minus before."""
        n = max(self.counts.sum(), 1)
        return float(self.counts[np.arange(len(self.counts)), self.perm].sum() - np.trace(self.counts)) / n

    def misordered(self) -> list[tuple[int, int, float]]:
        """(folder, logit the teacher takes it for, share), judged class by class.

        Folder ``c`` is misordered when over half its images go to one other logit ``d``,
        the best reordering maps ``c`` to ``d``, and folder ``d``'s own images are not mostly
        taken for ``d``. So one swapped pair among 1,000 classes stops the build, while a
        teacher that takes every class for the same one (unsuited, not misordered: the
        real agreement shows it) does not.
        """
        agreement = self.agreement
        out = []
        for c, row in enumerate(self.counts):
            d = int(row.argmax())
            share = row[d] / max(row.sum(), 1)
            if d != c and share > ORDER_MISMATCH and self.perm[c] == d and agreement[d] <= ORDER_MISMATCH:
                out.append((c, d, float(share)))
        return out


def check_class_order(counts: np.ndarray, classes: list[ClassInfo], suggestion: Path | None) -> OrderReport:
    """Raise D3MError (after writing ``suggestion``) if the teacher's logits are in another class order.

    Args:
        counts: :func:`teacher_confusion`'s matrix.
        classes: the build's classes, in archive (= teacher logit) order.
        suggestion: where to write the class list that fixes the order (``None``: do not write one).
    """
    report = OrderReport(counts, best_assignment(counts))
    bad = report.misordered()
    if not bad:
        return report
    by_logit = np.argsort(report.perm)  # logit k <- folder by_logit[k]
    def line(info: ClassInfo) -> str:  # read_class_list's format; a tab when the folder name holds spaces
        if info.name == info.id and not any(ch.isspace() for ch in info.id):
            return info.id
        return f"{info.id}\t{info.name}"

    lines = [line(classes[c]) for c in by_logit]
    shown = "; ".join(f"folder {classes[c].id!r} looks like class {d} ({classes[d].name!r}) "
                      f"on {100 * share:.0f}% of its images" for c, d, share in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    fix = "pass --classes with the class list in the teacher's logit order"
    if suggestion is not None:
        write_atomic(suggestion, ("\n".join(lines) + "\n").encode(), durable=False)
        before = np.trace(counts) / max(counts.sum(), 1)
        fix = (f"the order that maximises agreement ({100 * (before + report.gain):.0f}% instead of "
               f"{100 * before:.0f}%) is written to {suggestion}; check it and rerun with --classes {suggestion}")
    raise D3MError(f"the teacher's classes are in another order than the data's: {shown}{more}. {fix} "
                   "(or --ignore-class-order if this is intended). No archive was written.")


def domain_problems(real: list[float | None], regenerated: list[float],
                    precision: list[float | None] | None = None) -> list[int]:
    """Classes whose regenerated-patch agreement is far below the real one (or under 50 %), or whose
    precision on regenerated patches is under 50 %: d3m-inspect's rule (d3mfmt.agreement)."""
    precision = [None] * len(regenerated) if precision is None else precision
    return [c for c, (r, g, p) in enumerate(zip(real, regenerated, precision)) if low_agreement(r, g, p)]


def domain_message(name: str, real: float | None, regenerated: float, precision: float | None = None) -> str:
    """One sentence a user understands."""
    real_text = "" if real is None else f" (real patches: {100 * real:.0f}%)"
    piled = "" if precision is None or precision >= LOW_PRECISION else (
        f", and only {100 * precision:.0f}% of the regenerated patches it takes for this class are this class's "
        "(the rest are other classes' renders: its predictions pile up here)")
    return (f"class {name!r}: the teacher agrees with the class on {100 * regenerated:.0f}% of regenerated patches"
            f"{real_text}{piled}; the model does not render this class's images the way your teacher sees them, "
            "so the archive will train poorly; use a model that covers this data")


def regenerated_precision(probs: list[np.ndarray]) -> list[float | None]:
    """Per class ``d``: of every class's regenerated patches the teacher takes for ``d`` (top-1), the share that
    are ``d``'s own; None where the teacher takes none for ``d``. ``probs[c]`` is class c's ``[patches, C]``."""
    num_classes = len(probs)
    top = [p.argmax(axis=1) for p in probs]
    taken = sum(np.bincount(t, minlength=num_classes)[:num_classes] for t in top)
    own = np.array([int((t == c).sum()) for c, t in enumerate(top)])
    return [None if taken[c] == 0 else float(own[c] / taken[c]) for c in range(num_classes)]


def archive_warnings(classes: list[ClassInfo], real: list[float | None], regenerated: list[float],
                     precision: list[float | None]) -> list[str]:
    """The closing summary's warnings: an archive near chance overall, then every class the rule flags."""
    lines = []
    mean = float(np.mean(regenerated))
    if near_chance(mean, len(classes)):
        lines.append(f"  WARNING: overall the teacher agrees with the class on {100 * mean:.1f}% of regenerated "
                     f"patches, near chance for {len(classes)} classes ({100 / len(classes):.1f}%; flagged under "
                     f"{100 * near_chance_limit(len(classes)):.1f}%): this archive will not train a useful student; "
                     "use a model that covers this data, or a teacher trained on it")
    low = domain_problems(real, regenerated, precision)
    if low:
        lines.append(f"  WARNING: {len(low)} of {len(classes)} classes render poorly for the teacher:")
        lines += [f"    {domain_message(classes[c].name, real[c], regenerated[c], precision[c])}" for c in low]
    return lines


EARLY_RENDERS = 2  # images rendered from the class name before a class's inversion (the early domain check)


def early_domain_check(regen, c: int, seeds: list[int], teacher, grid: int, device: str) -> tuple[float, int]:
    """(the teacher's agreement with class ``c`` on patches of ``seeds``' renders, the class it takes most of them for).

    ``regen`` renders the class's initialiser (:func:`builder.initialisers.initial_vectors`) as row 0: a few
    renders, before the minutes of inversion, tell whether the model draws what the teacher knows.
    """
    from .labelling import render_and_label

    probs, _, _ = render_and_label(regen, 0, seeds, teacher, grid, 1.0, None, device)
    top = probs.argmax(axis=1)
    return float((top == c).mean()), int(np.bincount(top).argmax())
