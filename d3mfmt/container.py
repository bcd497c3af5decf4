"""The ZIP container: stored members, fixed order and timestamps, strict reading.

SPEC.md ("Container and members") is the authority. The writer emits every
member STORED with the DOS date 1980-01-01 00:00:00, mode 0644, no extra
fields and no comment, so identical members give identical bytes. The reader
works on bytes already in memory and keeps no file handle; it does not use
``zipfile`` but walks the end record, the central directory and every local
header itself, and refuses any disagreement between them, any extra field,
comment, flag, gap or trailing byte (SPEC.md's numbered MUST-reject list).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import zipfile
import zlib
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
# The header fields SPEC.md fixes on every member; a reader refuses any other value (an external
# attribute of 0o120777 would make `unzip` extract a symlink, 0o100777 an executable).
MADE_BY = (3 << 8) | 20  # "version made by": Unix (3), APPNOTE 2.0
VERSION_NEEDED = 20
DOS_TIME, DOS_DATE = 0, (0 << 9) | (1 << 5) | 1  # 00:00:00, 1980-01-01
INTERNAL_ATTR = 0
EXTERNAL_ATTR = 0o100644 << 16  # a regular file, rw-r--r--
MAX_ARCHIVE_BYTES = (1 << 32) - 1  # no ZIP64
# 30-byte local header + "mimetype": the media type sits at a fixed offset
MAGIC_OFFSET = 30 + len(MIMETYPE)
HEAD_BYTES = MAGIC_OFFSET + len(MEDIA_TYPE)  # what check_head needs


def write_zip(members: dict[str, bytes]) -> bytes:
    """The container bytes for members given in MEMBER_ORDER."""
    if tuple(members) != MEMBER_ORDER:
        raise D3MFormatError(f"members must be exactly {list(MEMBER_ORDER)} in that order, got {list(members)}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=False) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = MADE_BY >> 8  # unix
            info.external_attr = EXTERNAL_ATTR
            zf.writestr(info, data)
    out = buf.getvalue()
    if len(out) > MAX_ARCHIVE_BYTES:
        raise D3MFormatError(f"archive of {len(out)} bytes exceeds the 4 GiB limit of format 1.x")
    return out


# ZIP record layouts (APPNOTE 4.3.7, 4.3.12, 4.3.16), all little-endian
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # sig, needed, flags, method, time, date, crc, csize, usize, name, extra
CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")  # sig, made by, needed, ... , local header offset
END_RECORD = struct.Struct("<4sHHHHIIH")  # sig, disk, cd disk, entries here, entries, cd size, cd offset, comment
LOCAL_SIG, CENTRAL_SIG, END_SIG = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"


def read_zip(data: bytes) -> dict[str, memoryview]:
    """Check the container and return its members in order, as views into ``data``; raise D3MFormatError.

    The reader walks the local headers itself and requires every one to agree
    with its central-directory entry, so no other ZIP reader can see different
    content (SPEC.md "Container and members").
    """
    # 1. magic: the mimetype member first, uncompressed, at a fixed offset
    check_head(data[:HEAD_BYTES])
    if len(data) > MAX_ARCHIVE_BYTES:
        raise D3MFormatError(f"archive of {len(data)} bytes exceeds the 4 GiB limit of format 1.x")
    # 2. the end record is the last 22 bytes: no archive comment, no trailing bytes
    #    and the central directory ends exactly where it begins (no ZIP64 records)
    end = len(data) - END_RECORD.size
    total, cd_offset = check_end(data[max(end, 0) :], len(data))
    # 3. the central directory: exactly the four names, in order
    entries, pos = [], cd_offset
    for _ in range(total):
        entry = _central_entry(data, pos, end)
        pos += CENTRAL_HEADER.size + len(entry["name"]) + entry["extra"] + entry["comment"]
        entries.append(entry)
    if pos != end:
        raise D3MFormatError("ZIP container: the central directory's size does not match its entries")
    names = [_member_name(e["name"]) for e in entries]
    if len(names) != len(set(names)):
        raise D3MFormatError(f"ZIP container: duplicate member names in {names}")
    for name in names:
        if name not in MEMBER_ORDER:
            raise D3MFormatError(f"ZIP container: unexpected member {name!r}; expected exactly {list(MEMBER_ORDER)}")
    if tuple(names) != MEMBER_ORDER:
        raise D3MFormatError(f"ZIP container: members must be exactly {list(MEMBER_ORDER)} in that order, got {names}")
    # 4. each local header agrees with its central entry; no extras; members
    #    back to back from offset 0 up to the central directory
    view = memoryview(data)  # members are views: no copy of the payload
    members: dict[str, memoryview] = {}
    local = 0
    for name, entry in zip(names, entries):
        _check_entry(name, entry)
        if entry["offset"] != local:
            raise D3MFormatError(f"ZIP container: member {name!r} starts at byte {entry['offset']}, expected {local} "
                                 "(members must be back to back from the start of the file)")
        members[name], local = _local_member(view, name, entry, cd_offset)
    if local != cd_offset:
        raise D3MFormatError(f"ZIP container: {cd_offset - local} bytes between the last member and the central directory")
    if members[MIMETYPE] != MEDIA_TYPE:
        raise D3MFormatError(f"mimetype member must hold {MEDIA_TYPE.decode()!r}")
    return members


def check_head(head: bytes) -> None:
    """The file's first HEAD_BYTES: a stored 'mimetype' member holding the media type."""
    if head[:4] != LOCAL_SIG or head[30:MAGIC_OFFSET] != MIMETYPE.encode():
        raise D3MFormatError("not a .d3m archive: the file does not start with a ZIP 'mimetype' member")
    if head[MAGIC_OFFSET : MAGIC_OFFSET + len(MEDIA_TYPE)] != MEDIA_TYPE:
        raise D3MFormatError(f"not a .d3m archive: mimetype is not {MEDIA_TYPE.decode()!r}")


def check_end(tail: bytes, size: int) -> tuple[int, int]:
    """(entry count, central directory offset) from the last 22 bytes of a ``size``-byte file."""
    end = size - END_RECORD.size
    if end < 0 or tail[:4] != END_SIG:
        raise D3MFormatError("ZIP container: no end-of-central-directory record in the last 22 bytes "
                             "(truncated, trailing bytes or an archive comment)")
    _, disk, cd_disk, here, total, cd_size, cd_offset, comment = END_RECORD.unpack_from(tail, 0)
    if (disk, cd_disk, comment) != (0, 0, 0) or here != total:
        raise D3MFormatError("ZIP container: multi-disk archives and archive comments are not allowed")
    if cd_offset + cd_size != end:
        raise D3MFormatError("ZIP container: the central directory does not end at the end record "
                             "(truncated, a gap, or ZIP64 records)")
    return total, cd_offset


def _central_entry(data: bytes, pos: int, end: int) -> dict:
    """The central-directory entry at ``pos`` as a dict of its fields."""
    if pos + CENTRAL_HEADER.size > end or data[pos : pos + 4] != CENTRAL_SIG:
        raise D3MFormatError("ZIP container: corrupt central directory; the file may be truncated")
    f = CENTRAL_HEADER.unpack_from(data, pos)
    name_len, extra_len, comment_len, disk = f[10:14]
    if pos + CENTRAL_HEADER.size + name_len + extra_len + comment_len > end:
        raise D3MFormatError("ZIP container: corrupt central directory; the file may be truncated")
    start = pos + CENTRAL_HEADER.size
    return {"made_by": f[1], "needed": f[2], "flags": f[3], "method": f[4], "time": f[5], "date": f[6], "crc": f[7],
            "csize": f[8], "usize": f[9], "extra": extra_len, "comment": comment_len, "disk": disk,
            "internal": f[14], "external": f[15], "offset": f[16], "name": data[start : start + name_len]}


def _member_name(raw: bytes) -> str:
    """A member name as text; any byte outside printable ASCII (a NUL, say) is refused."""
    if not raw or any(b < 0x20 or b > 0x7E for b in raw):
        raise D3MFormatError(f"ZIP container: unexpected member {raw!r}; expected exactly {list(MEMBER_ORDER)}")
    return raw.decode("ascii")


def _check_entry(name: str, e: dict) -> None:
    """The central entry's own rules: stored, unencrypted, plain."""
    if e["method"] != 0:
        raise D3MFormatError(f"ZIP container: member {name!r} is compressed (method {e['method']}); every member must be STORED")
    if e["flags"] & 0x1:
        raise D3MFormatError(f"ZIP container: member {name!r} is encrypted")
    if e["flags"]:
        raise D3MFormatError(f"ZIP container: member {name!r} has general-purpose flags {e['flags']:#x}, expected 0 "
                             "(no data descriptor, no encryption)")
    if e["extra"] or e["comment"] or e["disk"]:
        raise D3MFormatError(f"ZIP container: member {name!r} has an extra field, a comment or a disk number; none is allowed")
    if e["csize"] != e["usize"]:
        raise D3MFormatError(f"ZIP container: member {name!r} has inconsistent sizes; the file may be truncated")
    if e["external"] != EXTERNAL_ATTR:
        mode = e["external"] >> 16
        kind = "a symlink" if stat.S_ISLNK(mode) else "a regular file" if stat.S_ISREG(mode) else "not a regular file"
        raise D3MFormatError(f"ZIP container: member {name!r} has external attributes {e['external']:#010x} "
                             f"(mode {mode:#o}, {kind}); SPEC requires {EXTERNAL_ATTR:#010x}, a regular file 0o100644")
    fixed = {"made_by": ("version made by", MADE_BY), "needed": ("version needed", VERSION_NEEDED),
             "time": ("DOS time", DOS_TIME), "date": ("DOS date", DOS_DATE), "internal": ("internal attributes", INTERNAL_ATTR)}
    for key, (what, want) in fixed.items():
        if e[key] != want:
            raise D3MFormatError(f"ZIP container: member {name!r} has {what} {e[key]:#x}, SPEC requires {want:#x} "
                                 "(a header field format 1.x fixes)")


def _local_member(data: memoryview, name: str, e: dict, limit: int) -> tuple[memoryview, int]:
    """(member bytes, offset after them) from the local header at ``e["offset"]``, which must match ``e``."""
    pos = e["offset"]
    if pos + LOCAL_HEADER.size > limit or data[pos : pos + 4] != LOCAL_SIG:
        raise D3MFormatError(f"ZIP container: member {name!r} has no local header where the central directory points")
    _, needed, flags, method, time, date, crc, csize, usize, name_len, extra_len = LOCAL_HEADER.unpack_from(data, pos)
    start = pos + LOCAL_HEADER.size
    local = {"needed": needed, "flags": flags, "method": method, "time": time, "date": date, "crc": crc,
             "csize": csize, "usize": usize, "name": data[start : start + name_len]}
    for key, value in local.items():
        if value != e[key]:
            raise D3MFormatError(f"ZIP container: member {name!r}: the local header's {key} differs from the central directory's")
    if extra_len:
        raise D3MFormatError(f"ZIP container: member {name!r} has a local extra field; none is allowed")
    start += name_len
    stop = start + e["usize"]
    if stop > limit:
        raise D3MFormatError(f"ZIP container: member {name!r} runs past the central directory; the file may be truncated")
    body = data[start:stop]
    if zlib.crc32(body) != e["crc"]:
        raise D3MFormatError(f"ZIP container: member {name!r} fails its CRC-32 check")
    return body, stop


@contextlib.contextmanager
def open_regular(path: str | os.PathLike):
    """``(unbuffered binary file, size)`` of a regular file of at most MAX_ARCHIVE_BYTES; D3MFormatError otherwise.

    The size and kind are checked from ``fstat`` before a byte is read, so a
    16 GiB (sparse) file, a FIFO or a device is refused at once, whatever the
    caller does with the file next (read it, hash it).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except FileNotFoundError:
        raise D3MFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise D3MFormatError(f"{path}: is a directory, expected a .d3m file") from None
    except PermissionError:
        raise D3MFormatError(f"{path}: permission denied") from None
    except OSError as exc:
        raise D3MFormatError(f"{path}: cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise D3MFormatError(f"{path}: is a directory, expected a .d3m file")
        if not stat.S_ISREG(st.st_mode):  # /dev/zero says size 0 and never ends; a FIFO may never end
            raise D3MFormatError(f"{path}: not a regular file (a device, FIFO or socket); pass a .d3m file")
        if st.st_size > MAX_ARCHIVE_BYTES:
            raise D3MFormatError(f"{path}: {st.st_size} bytes exceeds the 4 GiB limit of format 1.x")
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            yield f, st.st_size
    except OSError as exc:
        raise D3MFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole regular file, read once; a clear error when it is not one."""
    with open_regular(path) as (f, size):
        # the magic and the end record first, so a large file that is no archive is never read whole
        check_head(f.read(HEAD_BYTES))
        f.seek(max(size - END_RECORD.size, 0))
        check_end(f.read(END_RECORD.size), size)
        f.seek(0)
        data = f.read(size + 1)  # one byte more than stat says: a growing file shows up here
    if len(data) != size:
        raise D3MFormatError(f"{path}: read {len(data)} bytes but the file has {size}; it changed while being read")
    return data
