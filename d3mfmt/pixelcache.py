"""The on-disk pixel cache: one file per rendered image, shared by processes and epochs.

An archive's images live in ``<root>/<key>/``, where the key is a hash of the
archive's content hash, every setting that changes pixels
(``RenderSettings.key_parts``) and this file layout's rule; image ``i`` of class ``c`` is
``{c:06d}_{i:05d}.npy``. Each file is a ``.npy`` v1.0 of uint8 ``[3, H, W]``
followed by the sha256 of those bytes, written atomically (no fsync: a lost
file is rendered again). A read accepts only the exact header this image
needs and a matching digest: a torn, corrupted, zeroed or foreign file reads
as absent, and a header declaring a huge shape is never allocated; a FIFO or
other non-regular file never blocks. Importing this module imports no torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from pathlib import Path

import numpy as np

from .files import write_atomic

DIGEST_BYTES = 32  # sha256 of the .npy bytes, appended to every cache file
LAYOUT_RULE = "d3m-1-8bit-sha256"  # this file layout, part of every cache key


def cache_key(content_hash: str, key_parts: dict) -> str:
    """The folder name for an archive rendered under ``key_parts``: 32 hex digits (this layout's rule included)."""
    parts = {"content_hash": content_hash, **key_parts, "rule": LAYOUT_RULE}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class PixelCache:
    """One archive's cached images in ``folder``, each uint8 ``[3, height, width]``.

    Example:
        >>> cache = PixelCache(Path("/tmp/images/0123"), 64, 64)           # doctest: +SKIP
        >>> cache.write(0, 1, pixels)                                        # doctest: +SKIP
        >>> (cache.read(0, 1) == pixels).all()                               # doctest: +SKIP
        True
    """

    def __init__(self, folder: Path, height: int, width: int):
        self.folder, self.height, self.width = Path(folder), height, width
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                                   "shape": (3, height, width)})
        self._header = buf.getvalue()  # the exact .npy header of every file here

    def path(self, c: int, i: int) -> Path:
        """The file of image ``i`` of class ``c``."""
        return self.folder / f"{c:06d}_{i:05d}.npy"

    def read(self, c: int, i: int) -> np.ndarray | None:
        """The cached pixels, or None when absent or not exactly what :meth:`write` wrote."""
        header = self._header
        pixels = 3 * self.height * self.width
        size = len(header) + pixels + DIGEST_BYTES
        try:  # O_NONBLOCK: a FIFO planted in the cache must not hang the read
            fd = os.open(self.path(c, i), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None  # absent or unreadable: render (a write failure is reported there)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            blob = bytearray(size + 1)  # bounded by the expected size, whatever the header claims
            got = f.readinto(blob)
        body = memoryview(blob)[: size - DIGEST_BYTES]
        if got != size or body[: len(header)] != header or hashlib.sha256(body).digest() != blob[-DIGEST_BYTES - 1 : -1]:
            return None  # torn, corrupted, zeroed or foreign: render again (and overwrite it)
        return np.frombuffer(blob, dtype=np.uint8, count=pixels, offset=len(header)).reshape(3, self.height, self.width)

    def write(self, c: int, i: int, pixels: np.ndarray) -> None:
        """Store uint8 ``[3, height, width]`` pixels atomically; raises OSError when the folder is not writable."""
        body = self._header + np.ascontiguousarray(pixels).tobytes()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(c, i), body + hashlib.sha256(body).digest(), durable=False)
