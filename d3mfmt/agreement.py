"""The one rule for "this class renders poorly for the teacher", and for "this archive is near chance".

The builder records, per class, the teacher's top-1 agreement with the class
on its selected real patches and on its regenerated patches, and the class's
precision on regenerated patches (manifest ``build.agreement``); the builder
warns and ``d3m-inspect`` marks a class with the same rule, so both say the
same thing about the same archive.
"""

from __future__ import annotations

# A class renders poorly for the teacher when its agreement on regenerated patches is under
# half its agreement on real patches, or under 50 %.
LOW_AGREEMENT_RATIO = 0.5
LOW_AGREEMENT_FLOOR = 0.5
# ... or when its precision is under 50 %: over half of the regenerated patches (of every class)
# the teacher takes for it are other classes' (the teacher's predictions pile up on it).
LOW_PRECISION = 0.5


def low_agreement(real: float | None, regenerated: float, precision: float | None = None) -> bool:
    """True when ``regenerated`` is under the floor or the ratio times ``real`` (when known), or ``precision``
    (when known) is under :data:`LOW_PRECISION`."""
    return (regenerated < LOW_AGREEMENT_FLOOR or (real is not None and regenerated < LOW_AGREEMENT_RATIO * real)
            or (precision is not None and precision < LOW_PRECISION))


def near_chance_limit(num_classes: int) -> float:
    """The overall regenerated agreement under which an archive is "near chance": twice chance (2/C),
    and never above halfway from chance to perfect ((1 + 1/C) / 2, which binds for 2 and 3 classes)."""
    return min(2 / num_classes, (1 + 1 / num_classes) / 2)


def near_chance(mean_regenerated: float, num_classes: int) -> bool:
    """True when the teacher's overall agreement on regenerated patches is near chance (:func:`near_chance_limit`)."""
    return num_classes > 1 and mean_regenerated < near_chance_limit(num_classes)
