"""The container walk: every ZIP trick a different reader could read differently is refused.

``raw_zip`` below is an independent ZIP writer (not zipfile, not d3mfmt) whose
every field can be overridden, so each test changes exactly one thing.
"""

import os
import struct
import subprocess
import sys
import time
import zlib

import pytest
from conftest import members_of

import d3mfmt
from d3mfmt import D3MFormatError
from d3mfmt.summary import check


def raw_zip(entries, *, local=None, central=None, local_extra=b"", central_extra=b"", member_comment=b"",
            gap=b"", archive_comment=b"", trailing=b"", count=None, names=None, payload_after=None):
    """ZIP bytes for (name, data) pairs; ``local``/``central`` map an entry index to field overrides."""
    local, central = local or {}, central or {}
    body, directory = b"", b""
    for i, (name, data) in enumerate(entries):
        raw_name = (names or {}).get(i, name.encode())
        f = {"needed": 20, "flags": 0, "method": 0, "time": 0, "date": 0x21, "crc": zlib.crc32(data),
             "csize": len(data), "usize": len(data), "name": raw_name}
        lf, cf = {**f, **local.get(i, {})}, {**f, **central.get(i, {})}
        offset = len(body)
        extra = local_extra if i == 3 else b""
        body += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", lf["needed"], lf["flags"], lf["method"], lf["time"],
                            lf["date"], lf["crc"], lf["csize"], lf["usize"], len(lf["name"]), len(extra))
        body += lf["name"] + extra + data + ((payload_after or {}).get(i, b""))
        if i == 1:
            body += gap
        cextra, ccomment = (central_extra, member_comment) if i == 3 else (b"", b"")
        directory += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0x314, cf["needed"], cf["flags"], cf["method"],
                                 cf["time"], cf["date"], cf["crc"], cf["csize"], cf["usize"], len(cf["name"]),
                                 len(cextra), len(ccomment), 0, 0, 0o100644 << 16, offset)
        directory += cf["name"] + cextra + ccomment
    n = len(entries) if count is None else count
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(directory), len(body), len(archive_comment))
    return body + directory + end + archive_comment + trailing


@pytest.fixture
def entries(archive_bytes):
    return members_of(archive_bytes)


def test_raw_writer_reproduces_the_reference_bytes_closely_enough_to_load(entries, archive_bytes):
    a = d3mfmt.load(raw_zip(entries))
    assert a.content_hash == d3mfmt.load(archive_bytes).content_hash


@pytest.mark.parametrize(
    "change, msg",
    [
        ({"names": {3: b"labels.zst\x00.txt"}}, "unexpected member"),  # zipfile would truncate at the NUL
        ({"local": {2: {"method": 8}}}, "local header's method differs"),
        ({"local": {2: {"flags": 1}}}, "local header's flags differs"),
        ({"local": {3: {"csize": 5, "usize": 5}}}, "local header's csize differs"),
        ({"local": {3: {"crc": 1}}}, "local header's crc differs"),
        ({"local": {1: {"name": b"manifest.jsoN"}}}, "local header's name differs"),
        ({"local": {3: {"flags": 8}}, "central": {3: {"flags": 8}}}, "general-purpose flags 0x8"),  # data descriptor
        ({"local_extra": b"\x01\x00\x10\x00" + bytes(16)}, "local extra field"),  # a ZIP64 extra
        ({"central_extra": b"\x55\x54\x05\x00\x01\x00\x00\x00\x00"}, "extra field"),
        ({"member_comment": b"hi"}, "comment"),
        ({"archive_comment": b"hello"}, "end-of-central-directory"),
        ({"trailing": b"\x00"}, "end-of-central-directory"),
        ({"gap": b"\x00" * 4}, "starts at byte"),
        ({"payload_after": {3: b"xx"}}, "bytes between the last member"),
        ({"count": 5}, "central directory"),
        ({"count": 3}, "central directory"),
    ],
)
def test_container_tricks_are_refused(entries, change, msg):
    with pytest.raises(D3MFormatError, match=msg):
        d3mfmt.load(raw_zip(entries, **change))


def test_crc_mismatch_in_both_headers(entries):
    with pytest.raises(D3MFormatError, match="CRC-32"):
        d3mfmt.load(raw_zip(entries, local={3: {"crc": 7}}, central={3: {"crc": 7}}))


def test_check_mode_refuses_them_too(entries):
    assert check(raw_zip(entries, trailing=b"junk"))


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression must not eat the machine


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_special_files_fail_fast(tmp_path, kind):
    path = kind
    if kind == "fifo":
        path = tmp_path / "pipe.d3m"
        os.mkfifo(path)  # no writer: a plain open() would block forever
    code = "import sys, d3mfmt\ntry:\n    d3mfmt.load_file(sys.argv[1])\nexcept d3mfmt.D3MError as e:\n    print(e)\n"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30,
                         preexec_fn=_limit_memory)
    assert "not a regular file" in out.stdout, out.stderr
    assert time.monotonic() - t0 < 20


def test_d3m_inspect_on_dev_zero_exits_cleanly():
    code = "from d3mfmt.cli import inspect_main; inspect_main(['check', '/dev/zero'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=_limit_memory)
    assert out.returncode != 0 and "not a regular file" in out.stderr and "Traceback" not in out.stderr


def test_a_large_file_that_is_no_archive_is_not_read_whole(tmp_path, archive_bytes):
    import resource

    sparse = tmp_path / "zeros.d3m"
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB of zeros, no disk used
    headed = tmp_path / "headed.d3m"
    with open(headed, "wb") as f:
        f.write(archive_bytes[:200])
        f.truncate(3 << 30)  # a real head, no end record
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(D3MFormatError, match="not a .d3m archive"):
        d3mfmt.load_file(sparse)
    with pytest.raises(D3MFormatError, match="end-of-central-directory"):
        d3mfmt.load_file(headed)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB: nothing near 3 GiB
