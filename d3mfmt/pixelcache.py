"""The on-disk pixel cache: one file per rendered image, shared by processes, ranks and epochs.

An archive's images live in ``<root>/<name>/``, where the name is a hash of the
archive's content hash, every setting that changes pixels
(``RenderSettings.key_parts``) and this file layout's rule; image ``i`` of class ``c`` is
``{c:06d}_{i:05d}.npy``. Each file is a ``.npy`` v1.0 of uint8 ``[3, H, W]``
followed by a 32-byte tag, written atomically (no fsync: a lost file is
rendered again). The tag is HMAC-SHA256 under the cache's own random key
(``<root>/.d3m-pixelcache-key``, 32 bytes, mode 0600, made by the first
process that writes) of the folder name, the image's file name and the
``.npy`` bytes, so a file is genuine only for its archive, settings and slot.

A read accepts only the exact header this image needs and a matching tag: a
torn, corrupted, zeroed, foreign or planted file reads as absent (and is
rendered again), a header declaring a huge shape is never allocated, and a
FIFO or other non-regular file never blocks. A file whose tag was checked is
not hashed again by the same :class:`PixelCache` while its inode, size,
mtime and ctime stay the same (any rewrite, rename or in-place change moves
ctime), so an epoch after the first costs a read, not a hash.

Threat model. The tag stops accidents (torn or damaged files, files copied in
from another cache, archive, setting or slot) and anyone who can put files
into the cache folder without being able to read the key: a file with a
recomputed sha256, or a whole cache folder shared from another machine, is
not served. It does not stop someone who can read the key file or replace it
(write access to ``<root>`` itself, or the same user account): they can forge
tags, as they could edit the archive or the installed package. Keep the
cache root writable only by the accounts that render into it. Importing this
module imports no torch.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np

from .errors import D3MError
from .files import write_atomic

TAG_BYTES = 32  # HMAC-SHA256 tag appended to every cache file
KEY_BYTES = 32  # the cache root's random key
KEY_FILE = ".d3m-pixelcache-key"  # beside the keyed folders, in the cache root
LAYOUT_RULE = "d3m-2-8bit-hmac-sha256"  # this file layout, part of every cache key


def cache_key(content_hash: str, key_parts: dict) -> str:
    """The folder name for an archive rendered under ``key_parts``: 32 hex digits (this layout's rule included)."""
    parts = {"content_hash": content_hash, **key_parts, "rule": LAYOUT_RULE}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _read_regular(path: Path, limit: int) -> tuple[bytearray, int, os.stat_result] | None:
    """(buffer of ``limit`` + 1 bytes, bytes read, fstat) of a regular file; None when absent or not regular.

    At most ``limit`` + 1 bytes are read, whatever the file's size, so a huge
    file is never allocated and a longer one shows as ``limit + 1``. Raises
    OSError other than FileNotFoundError (e.g. permission denied).
    """
    try:  # O_NONBLOCK: a FIFO planted in the cache must not hang the read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        blob = bytearray(limit + 1)
        got = f.readinto(blob)
    return blob, got, st


def cache_secret(root: Path, create: bool) -> bytes | None:
    """The cache root's random key; made (atomically, first writer wins) when ``create``, else None if absent.

    Raises D3MError for a key file that is not a regular file of exactly 32
    bytes, and OSError when it cannot be read, or made in a folder that cannot
    be written.
    """
    path = Path(root) / KEY_FILE
    found = _read_regular(path, KEY_BYTES)
    if found is None and create:
        Path(root).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{KEY_FILE}.", suffix=".tmp", dir=root)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic and never overwrites: concurrent ranks all end up with one key
            except FileExistsError:
                pass
        finally:
            Path(tmp).unlink(missing_ok=True)
    if found is None:
        found = _read_regular(path, KEY_BYTES)  # ours, or one another process made meanwhile
    if found is None and not os.path.lexists(path):
        return None
    if found is None or found[1] != KEY_BYTES:
        what = "not a regular file" if found is None else f"{found[1]} bytes, expected {KEY_BYTES}"
        raise D3MError(f"{path} is not a pixel-cache key ({what}); delete it (the cached images are then "
                       "rendered again)")
    return bytes(found[0][:KEY_BYTES])


def _signature(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes could have: device, inode, size, mtime and ctime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class PixelCache:
    """One archive's cached images in ``root / name``, each uint8 ``[3, height, width]``.

    Example:
        >>> cache = PixelCache(Path("/tmp/images"), "0123abcd", 64, 64)     # doctest: +SKIP
        >>> cache.write(0, 1, pixels)                                        # doctest: +SKIP
        >>> (cache.read(0, 1) == pixels).all()                               # doctest: +SKIP
        True
    """

    def __init__(self, root: Path, name: str, height: int, width: int):
        self.root, self.name, self.height, self.width = Path(root), name, height, width
        self.folder = self.root / name
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                                   "shape": (3, height, width)})
        self._header = buf.getvalue()  # the exact .npy header of every file here
        self._secret: bytes | None = None
        self._verified: dict[tuple[int, int], tuple[int, ...]] = {}  # (c, i) -> signature of the file checked

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_secret"] = None  # read again from the key file; the verified signatures stay valid
        return state

    def path(self, c: int, i: int) -> Path:
        """The file of image ``i`` of class ``c``."""
        return self.folder / f"{c:06d}_{i:05d}.npy"

    def _tag(self, c: int, i: int, body) -> bytes:
        mac = hmac.new(self._secret, f"{self.name}/{c:06d}_{i:05d}\0".encode(), hashlib.sha256)
        mac.update(body)
        return mac.digest()

    def read(self, c: int, i: int) -> np.ndarray | None:
        """The cached pixels, or None when absent or not exactly what :meth:`write` wrote."""
        header, pixels = self._header, 3 * self.height * self.width
        size = len(header) + pixels + TAG_BYTES
        try:
            found = _read_regular(self.path(c, i), size)
        except OSError:
            found = None  # unreadable: render (a write failure is reported there)
        if found is None:
            return None
        blob, got, st = found
        body = memoryview(blob)[: size - TAG_BYTES]
        if got != size or body[: len(header)] != header:
            return None  # torn, truncated, too long or another shape: render again (and overwrite it)
        if self._verified.get((c, i)) != _signature(st):
            if self._secret is None:
                try:
                    self._secret = cache_secret(self.root, create=False)
                except OSError:
                    return None  # a key that cannot be read verifies nothing: render (writing then reports it)
            if self._secret is None or not hmac.compare_digest(self._tag(c, i, body), blob[size - TAG_BYTES : size]):
                return None  # corrupted, zeroed, foreign or planted: render again (and overwrite it)
            self._verified[(c, i)] = _signature(st)
        return np.frombuffer(blob, dtype=np.uint8, count=pixels, offset=len(header)).reshape(3, self.height, self.width)

    def write(self, c: int, i: int, pixels: np.ndarray) -> None:
        """Store uint8 ``[3, height, width]`` pixels atomically; raises OSError when the folder is not writable.

        The file is then read back and verified once (cheap next to rendering),
        so this process reads it later without hashing it again.
        """
        body = self._header + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        if self._secret is None:
            self._secret = cache_secret(self.root, create=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(c, i), body + self._tag(c, i, body), durable=False)
        self.read(c, i)
