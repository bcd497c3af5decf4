"""Drift check: regenerate a sample of images and compare their fingerprints.

SPEC.md "Fingerprint" defines the stored values; the drift of an image is the
largest absolute difference between its stored and recomputed fingerprint, in
8-bit levels. Rendering here never reads a pixel cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .archive import Archive
from .errors import D3MError
from .render import RenderOptions
from .terminal import printable

DEFAULT_TOLERANCE = 8  # 8-bit levels, SPEC.md "Fingerprint"


@dataclass(frozen=True)
class VerifyReport:
    images: list[tuple[int, int]]  # (class, image) pairs checked
    drift: np.ndarray  # [n] max |stored - recomputed| per image, 8-bit levels
    tolerance: int

    @property
    def ok(self) -> bool:
        return bool(self.drift.max(initial=0) <= self.tolerance)

    def lines(self, class_names: list[str]) -> list[str]:
        out = [f"  class {c} ({printable(class_names[c])}) image {i}: drift {int(d)}" for (c, i), d in zip(self.images, self.drift)]
        verdict = "OK" if self.ok else "FAILED"
        out.append(
            f"verify {verdict}: {len(self.images)} images, max drift {int(self.drift.max(initial=0))}, "
            f"mean {float(self.drift.mean()) if len(self.drift) else 0.0:.2f} (tolerance {self.tolerance} of 255)"
        )
        return out


def sample_images(archive: Archive, n: int) -> list[tuple[int, int]]:
    """``n`` (class, image) pairs spread evenly over the archive, in archive order."""
    ds = archive.manifest.dataset
    total = ds.num_images
    picks = np.unique(np.linspace(0, total - 1, num=min(n, total)).round().astype(int))
    return [divmod(int(k), ds.ipc) for k in picks]


def check_verify(archive: Archive, n: int, tolerance: int = DEFAULT_TOLERANCE) -> None:
    """Raise D3MError if ``verify`` cannot run (``verify`` calls it before any model loads)."""
    if archive.fingerprints is None:
        raise D3MError("the archive has no fingerprints (manifest 'fingerprints' is null); nothing to verify against")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise D3MError(f"n (d3m-inspect verify: --images) must be a positive integer, got {n!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or not 0 <= tolerance <= 255:
        raise D3MError(f"tolerance (d3m-inspect verify: --tolerance) must be in 0..255 (8-bit levels), got {tolerance!r}")


def verify(archive: Archive, render: RenderOptions | None = None, n: int = 8, tolerance: int = DEFAULT_TOLERANCE,
           render_batch: int | None = None) -> VerifyReport:
    """Regenerate ``n`` images under ``render`` and measure fingerprint drift.

    The arguments are checked before the model loads. The sampled images render
    ``render_batch`` per call (default ``generator.DEFAULT_RENDER_BATCH``), classes mixed.

    Example:
        >>> report = verify(d3mfmt.load_file("spec/vectors/topk.d3m"), RenderOptions(device="cpu"))  # doctest: +SKIP
        >>> report.ok                                                                              # doctest: +SKIP
        True
    """
    from .generator import DEFAULT_RENDER_BATCH, Regenerator, fingerprint

    # 1. check inputs, then load the model
    check_verify(archive, n, tolerance)
    regenerator = Regenerator(archive.manifest.generator, archive.embeddings, render,
                              num_images=archive.manifest.dataset.num_images)
    size = archive.manifest.fingerprint_size
    batch = render_batch or DEFAULT_RENDER_BATCH
    images = sample_images(archive, n)
    drift = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        rendered = regenerator.render_pairs([(c, int(archive.seeds[c, i])) for c, i in chunk])
        got = fingerprint(rendered, size).astype(np.int16)
        want = np.stack([archive.fingerprints[c, i] for c, i in chunk]).astype(np.int16)
        drift.extend(np.abs(got - want).reshape(len(chunk), -1).max(axis=1).tolist())
    return VerifyReport(images, np.asarray(drift, dtype=np.int64), tolerance)
