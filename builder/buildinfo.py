"""The build's informative record in the manifest (SPEC: ``build.agreement``, ``build.inversion``).

Per class: the teacher's top-1 agreement on real and regenerated patches and the class's precision,
and what textual inversion did (initialiser -> vector kept). Readers must not depend on it;
``d3m-inspect`` summarises it (``d3mfmt.summary``).
"""

from __future__ import annotations

import numpy as np


INVERSION_RECORD = (  # what build.inversion records per class (only the keys a checkpoint has)
    "init_words",  # the words the initialiser was made from (builder/initialisers.py)
    "val_loss_init", "val_loss_best", "best_step",  # denoising loss on the fixed validation triples
    "render_init", "render_best",  # teacher agreement on the scoring renders (builder/keepbest.py)
    "norm_init", "norm_best", "vocab_norm",  # mean L2 norm over slots; the vocabulary's mean token norm
    "skipped_steps",  # fp16 steps skipped for an inf/NaN gradient
)


def inversion_record(stats: dict) -> dict:
    """One class's ``build.inversion`` entry: the :data:`INVERSION_RECORD` keys it has, floats to 6 places."""
    return {k: round(stats[k], 6) if isinstance(stats[k], float) else stats[k] for k in INVERSION_RECORD if k in stats}


def agreement_info(classes: list[dict], metas: list[dict], precision: list[float | None] | None = None) -> dict:
    """Build info: the teacher's top-1 agreement with each class on real and on regenerated patches.

    ``precision`` (:func:`builder.guards.regenerated_precision`): per class, the share of the
    regenerated patches (of every class) the teacher takes for it that are its own.
    """
    per_class = {}
    for c, m in enumerate(metas):
        entry = {"regenerated": round(float(m["regenerated"]), 4)}
        if precision is not None and precision[c] is not None:
            entry["precision"] = round(float(precision[c]), 4)
        if m.get("real_agreement") is not None:  # absent in checkpoints of older builds
            entry["real"] = round(float(m["real_agreement"]), 4)
        per_class[classes[c]["id"]] = entry
    # per class: textual inversion, initialiser -> vector kept (builder/inversion.py)
    inversion = {c["id"]: inversion_record(m["inversion"])
                 for c, m in zip(classes, metas) if "inversion" in m}  # absent in checkpoints of older builds
    return {
        "regenerated_patch_agreement": round(float(np.mean([m["regenerated"] for m in metas])), 6),
        "agreement": per_class,
        **({"inversion": inversion} if inversion else {}),
    }
