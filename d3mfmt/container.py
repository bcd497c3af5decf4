"""The ZIP container: stored members, fixed order and timestamps, strict reading.

SPEC.md ("Container and members") is the authority. The writer emits every
member STORED with the DOS date 1980-01-01 00:00:00, mode 0644, no extra
fields and no comment, so identical members give identical bytes. The reader
works on bytes already in memory and keeps no file handle.
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path

from .errors import D3MFormatError

MEDIA_TYPE = b"application/vnd.d3m+zip"
MIMETYPE = "mimetype"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
LABELS = "labels.zst"
MEMBER_ORDER = (MIMETYPE, MANIFEST, TENSORS, LABELS)
PAYLOAD_MEMBERS = (TENSORS, LABELS)  # the members the manifest hashes

ZIP_DATE = (1980, 1, 1, 0, 0, 0)
MAX_ARCHIVE_BYTES = (1 << 32) - 1  # no ZIP64
# 30-byte local header + "mimetype": the media type sits at a fixed offset
MAGIC_OFFSET = 30 + len(MIMETYPE)


def write_zip(members: dict[str, bytes]) -> bytes:
    """The container bytes for members given in MEMBER_ORDER."""
    if tuple(members) != MEMBER_ORDER:
        raise D3MFormatError(f"members must be exactly {list(MEMBER_ORDER)} in that order, got {list(members)}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=False) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # unix
            info.external_attr = 0o100644 << 16
            zf.writestr(info, data)
    out = buf.getvalue()
    if len(out) > MAX_ARCHIVE_BYTES:
        raise D3MFormatError(f"archive of {len(out)} bytes exceeds the 4 GiB limit of format 1.x")
    return out


def read_zip(data: bytes) -> dict[str, bytes]:
    """Check the container and return its members in order; raise D3MFormatError."""
    # 1. magic: the mimetype member first, uncompressed, at a fixed offset
    if data[:4] != b"PK\x03\x04" or data[30:MAGIC_OFFSET] != MIMETYPE.encode():
        raise D3MFormatError("not a .d3m archive: the file does not start with a ZIP 'mimetype' member")
    if data[MAGIC_OFFSET : MAGIC_OFFSET + len(MEDIA_TYPE)] != MEDIA_TYPE:
        raise D3MFormatError(f"not a .d3m archive: mimetype is not {MEDIA_TYPE.decode()!r}")
    if len(data) > MAX_ARCHIVE_BYTES:
        raise D3MFormatError(f"archive of {len(data)} bytes exceeds the 4 GiB limit of format 1.x")
    # 2. central directory
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as exc:
        raise D3MFormatError(f"corrupt ZIP container ({exc}); the file may be truncated") from None
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(names) != len(set(names)):
        raise D3MFormatError(f"ZIP container: duplicate member names in {names}")
    for name in names:
        if name not in MEMBER_ORDER:
            raise D3MFormatError(f"ZIP container: unexpected member {name!r}; expected exactly {list(MEMBER_ORDER)}")
    if tuple(names) != MEMBER_ORDER:
        raise D3MFormatError(f"ZIP container: members must be exactly {list(MEMBER_ORDER)} in that order, got {names}")
    # 3. every member stored, unencrypted, laid out back to back
    members: dict[str, bytes] = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise D3MFormatError(f"ZIP container: member {info.filename!r} is compressed; every member must be STORED")
        if info.flag_bits & 0x1:
            raise D3MFormatError(f"ZIP container: member {info.filename!r} is encrypted")
        if info.compress_size != info.file_size or info.header_offset + info.file_size > len(data):
            raise D3MFormatError(f"ZIP container: member {info.filename!r} has inconsistent sizes; the file may be truncated")
        try:
            members[info.filename] = zf.read(info)  # checks the CRC-32
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as exc:
            raise D3MFormatError(f"ZIP container: member {info.filename!r} is unreadable ({exc})") from None
    if members[MIMETYPE] != MEDIA_TYPE:
        raise D3MFormatError(f"mimetype member must hold {MEDIA_TYPE.decode()!r}")
    return members


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, read once; a clear error when it is not there."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_ARCHIVE_BYTES:
            raise D3MFormatError(f"{path}: {size} bytes exceeds the 4 GiB limit of format 1.x")
        return path.read_bytes()
    except FileNotFoundError:
        raise D3MFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise D3MFormatError(f"{path}: is a directory, expected a .d3m file") from None
    except PermissionError:
        raise D3MFormatError(f"{path}: permission denied") from None


def write_atomic(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write to a unique temporary file beside ``path`` (fsync'd when ``durable``), then rename over it."""
    path = Path(path)
    if not path.parent.is_dir():
        raise D3MFormatError(f"{path}: the folder {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
