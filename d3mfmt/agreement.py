"""The one rule for "this class renders poorly for the teacher".

The builder records, per class, the teacher's top-1 agreement with the class
on its selected real patches and on its regenerated patches (manifest
``build.agreement``); the builder warns and ``d3m-inspect`` marks a class with
the same rule, so both say the same thing about the same archive.
"""

from __future__ import annotations

# A class renders poorly for the teacher when its agreement on regenerated patches is under
# half its agreement on real patches, or under 50 %.
LOW_AGREEMENT_RATIO = 0.5
LOW_AGREEMENT_FLOOR = 0.5


def low_agreement(real: float | None, regenerated: float) -> bool:
    """True when ``regenerated`` is under the floor, or under the ratio times ``real`` (when known)."""
    return regenerated < LOW_AGREEMENT_FLOOR or (real is not None and regenerated < LOW_AGREEMENT_RATIO * real)
