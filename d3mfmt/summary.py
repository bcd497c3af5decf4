"""What ``d3m-inspect`` reports: a summary dict, its text rendering, and ``check``."""

from __future__ import annotations

import json
import math

from . import container
from .agreement import low_agreement, near_chance
from .archive import Archive, check_member
from .errors import D3MFormatError
from .labels import MAX_LABEL_TABLE, decompress
from .manifest import Manifest
from .renderable import RenderLimits, check_render_cost
from .tensors import parse_tensors
from .terminal import printable


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    return float(value) if ok else None


def agreement_summary(archive: Archive) -> dict | None:
    """Per-class teacher agreement from the build info (None when the archive records none).

    Build info is free-form: entries that are not fractions in [0, 1] are ignored.
    """
    recorded = archive.manifest.build.get("agreement")
    if not isinstance(recorded, dict):
        return None
    rows = []
    for c in archive.manifest.dataset.classes:
        entry = recorded.get(c.id)
        if not isinstance(entry, dict) or _number(entry.get("regenerated")) is None:
            continue
        rows.append({"id": c.id, "name": c.name, "regenerated": _number(entry["regenerated"]),
                     "real": _number(entry.get("real")), "precision": _number(entry.get("precision"))})
    if not rows:
        return None
    real = [r["real"] for r in rows if r["real"] is not None]
    mean = sum(r["regenerated"] for r in rows) / len(rows)
    return {
        "classes": len(rows),
        "regenerated_mean": round(mean, 4),
        "real_mean": round(sum(real) / len(real), 4) if real else None,
        "near_chance": near_chance(mean, len(archive.manifest.dataset.classes)),
        "low": [r for r in rows if low_agreement(r["real"], r["regenerated"], r["precision"])],
    }


def inversion_summary(build: dict) -> dict | None:
    """The builder's per-class inversion validation losses, summed up; None if the build info has none.

    ``build`` is free-form provenance, so entries that are not ``{"val_loss_init": x > 0,
    "val_loss_best": y, ...}`` are counted as unreadable rather than trusted.
    """
    per_class = build.get("inversion") if isinstance(build, dict) else None
    if not isinstance(per_class, dict) or not per_class:
        return None
    changes = []
    for entry in per_class.values():
        init = entry.get("val_loss_init") if isinstance(entry, dict) else None
        best = entry.get("val_loss_best") if isinstance(entry, dict) else None
        if isinstance(init, (int, float)) and isinstance(best, (int, float)) and init > 0:
            change = (best - init) / init  # finite inputs, yet it may overflow (1e300 / 1e-300)
            if math.isfinite(change):
                changes.append(change)
    mean = sum(changes) / len(changes) if changes else None  # finite terms, yet the sum may overflow
    return {
        "classes": len(per_class),
        "improved": sum(c < 0 for c in changes),
        "unreadable": len(per_class) - len(changes),
        "mean_val_loss_change": round(mean, 6) if mean is not None and math.isfinite(mean) else None,
        "renders": render_summary(per_class),
    }


def render_summary(per_class: dict) -> dict | None:
    """Mean teacher agreement on the builder's scoring renders, initialiser -> vector kept; None without them.

    Only entries whose ``render_init`` and ``render_best`` are fractions count; ``moved`` counts
    the classes whose kept vector is not the initialiser (``best_step`` > 0).
    """
    pairs, moved = [], 0
    for entry in per_class.values():
        init, best = (entry.get("render_init"), entry.get("render_best")) if isinstance(entry, dict) else (None, None)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in (init, best)):
            pairs.append((init, best))
            step = entry.get("best_step")
            moved += isinstance(step, (int, float)) and step > 0
    if not pairs:
        return None
    return {"classes": len(pairs), "moved": moved, "init": round(sum(p[0] for p in pairs) / len(pairs), 6),
            "kept": round(sum(p[1] for p in pairs) / len(pairs), 6)}


def summarize(archive: Archive, members: dict[str, int], file_size: int) -> dict:
    """A JSON-able summary of a loaded archive.

    Args:
        archive: the loaded archive.
        members: member name -> stored bytes, in archive order.
        file_size: bytes of the whole file.
    """
    m = archive.manifest
    ds, gen, emb, lab = m.dataset, m.generator, m.embeddings, m.labels
    return {
        "format_version": f"{m.version[0]}.{m.version[1]}",
        "content_hash": archive.content_hash,
        "file_bytes": file_size,
        "bytes_per_class": round(file_size / ds.num_classes, 1),
        "members": members,
        "dataset": {
            "name": ds.name,
            "classes": ds.num_classes,
            "class_ids": [c.id for c in ds.classes],
            "class_names": [c.name for c in ds.classes],
            "ipc": ds.ipc,
            "grid": ds.grid,
            "images": ds.num_images,
            "patches": ds.num_patches,
            "source": None if ds.source is None else vars(ds.source),
        },
        "generator": {
            "pipeline": gen.pipeline,
            "model": gen.model.id,
            "revision": gen.model.revision,
            "variant": gen.model.variant,
            "model_identity": gen.model.identity,
            "scheduler": gen.scheduler,
            "steps": gen.steps,
            "guidance_scale": gen.guidance_scale,
            "size": [gen.height, gen.width],
            "latent_shape": list(gen.latent_shape),
            "dtype": gen.dtype,
            "prompt_template": gen.prompt_template,
        },
        "embeddings": {"n_vectors": emb.n_vectors, "dim": emb.dim, "dtype": emb.dtype},
        "teacher": None if m.teacher is None else vars(m.teacher),
        "labels": {
            "kind": lab.kind,
            "k": lab.k,
            "values": lab.values,
            "temperature": lab.temperature,
            "index_dtype": lab.index_dtype(ds.num_classes),
            "bytes_per_patch": round(members[container.LABELS] / ds.num_patches, 2),
        },
        "fingerprints": None if m.fingerprint_size is None else {"size": m.fingerprint_size},
        "agreement": agreement_summary(archive),
        "inversion": inversion_summary(m.build),
    }


def summary_json(s: dict) -> str:
    """``summarize``'s dict as strict JSON (``d3m-inspect --json``): never ``NaN`` or ``Infinity``.

    Every number in the summary is finite by construction (the manifest's are
    checked, derived ones that overflow are left out); ``allow_nan=False`` makes
    a slip a loud error rather than output that JSON parsers refuse.
    """
    return json.dumps(s, indent=1, allow_nan=False)


def render_text(s: dict, max_names: int = 6) -> str:
    """Human-readable rendering of ``summarize``'s dict, control characters escaped."""
    ds, gen, lab = s["dataset"], s["generator"], s["labels"]
    names = ", ".join(f"{i}:{n}" for i, n in zip(ds["class_ids"][:max_names], ds["class_names"][:max_names]))
    if ds["classes"] > max_names:
        names += f", ... ({ds['classes'] - max_names} more)"
    teacher = s["teacher"]
    teacher_line = "none"
    if teacher:
        acc = "" if teacher["accuracy"] is None else f", held-out accuracy {teacher['accuracy']:.4f}"
        teacher_line = f"{teacher['name']} ({teacher['identity'] or 'no identity'}{acc})"
    k = "" if lab["k"] is None else f" k={lab['k']}"
    values = "" if lab["values"] is None else f" values={lab['values']}"
    lines = [
        f"d3m archive, format {s['format_version']}, {s['file_bytes']:,} bytes ({s['bytes_per_class']:,} per class)",
        f"content hash  {s['content_hash']}",
        f"dataset       {ds['name']}: {ds['classes']} classes, ipc {ds['ipc']}, grid {ds['grid']}x{ds['grid']}, "
        f"{ds['images']} images, {ds['patches']} patches",
        f"classes       {names}",
        f"generator     {gen['model']}" + (f"@{gen['revision']}" if gen["revision"] else "")
        + (f", variant {gen['variant']}" if gen.get("variant") else "")
        + f" ({gen['model_identity'] or 'no identity'})",
        f"              {gen['pipeline']}, {gen['scheduler']}, {gen['steps']} steps, guidance {gen['guidance_scale']}, "
        f"{gen['size'][0]}x{gen['size'][1]} px, latents {'x'.join(map(str, gen['latent_shape']))}, {gen['dtype']}",
        f"              prompt {gen['prompt_template']!r}",
        f"embeddings    {s['embeddings']['n_vectors']} x {s['embeddings']['dim']} {s['embeddings']['dtype']} per class",
        f"teacher       {teacher_line}",
        f"labels        {lab['kind']}{k}{values} (T={lab['temperature']}), {lab['bytes_per_patch']} bytes/patch",
        "members",
    ]
    agreement = s.get("agreement")
    if agreement:
        real = "" if agreement["real_mean"] is None else f" (selected real patches: {100 * agreement['real_mean']:.1f}%)"
        lines.insert(-1, f"agreement     teacher top-1 = class on {100 * agreement['regenerated_mean']:.1f}% of "
                         f"regenerated patches{real}")
        if agreement["near_chance"]:
            lines.insert(-1, f"  NEAR CHANCE overall agreement is near chance for {ds['classes']} classes: "
                             "this archive will not train a useful student")
        if agreement["low"]:
            low = ", ".join(f"{r['name']} {100 * r['regenerated']:.0f}%"
                            + ("" if r["real"] is None else f" (real {100 * r['real']:.0f}%)")
                            for r in agreement["low"][:max_names])
            more = f", ... ({len(agreement['low']) - max_names} more)" if len(agreement["low"]) > max_names else ""
            lines.insert(-1, f"  LOW         {len(agreement['low'])} of {agreement['classes']} classes render poorly "
                             f"for the teacher: {low}{more}")
    inv = s.get("inversion")
    if inv:
        mean = "" if inv["mean_val_loss_change"] is None else f", mean {100 * inv['mean_val_loss_change']:+.1f}%"
        bad = f", {inv['unreadable']} unreadable" if inv["unreadable"] else ""
        lines.insert(-1, f"inversion     val loss improved on {inv['improved']}/{inv['classes']} classes{mean}{bad}")
        if inv.get("renders"):
            r = inv["renders"]
            lines.insert(-1, f"              teacher on scoring renders {100 * r['init']:.1f}% -> {100 * r['kept']:.1f}% "
                             f"(initialiser -> kept; vector moved in {r['moved']}/{r['classes']} classes)")
    lines += [f"  {name:<22}{size:>12,} bytes" for name, size in s["members"].items()]
    return "\n".join(printable(line) for line in lines)


def check(data: bytes, *, max_label_bytes: int = MAX_LABEL_TABLE, render_limits: RenderLimits | None = None) -> list[str]:
    """Every problem found in archive bytes, one message each; [] when valid (keywords as ``d3mfmt.load``)."""
    try:
        members = container.read_zip(data)
        manifest = Manifest.from_json(members[container.MANIFEST])
    except D3MFormatError as exc:
        return [str(exc)]  # nothing further can be checked without these
    problems = []
    for name in container.PAYLOAD_MEMBERS:
        try:
            check_member(manifest, name, members[name])
        except D3MFormatError as exc:
            problems.append(str(exc))
    ds = manifest.dataset
    for stage in (
        lambda: check_render_cost(manifest, render_limits),
        lambda: parse_tensors(manifest, members[container.TENSORS]),
        lambda: decompress(members[container.LABELS], manifest.labels, ds.num_patches, ds.num_classes,
                           max_bytes=max_label_bytes),
    ):
        try:
            stage()
        except D3MFormatError as exc:
            problems.append(str(exc))
    return problems
