"""Seeded fuzzing of the golden vectors: every mutation loads or raises D3MError, quickly.

Byte-level mutations (truncations, flips, splices) mostly stop at the magic,
the container walk or a CRC, so half the cases mutate one member's bytes and
then repair the container and the manifest's hashes, which takes them past
those checks into the JSON, safetensors and zstd parsers. A third of the
cases set a random manifest field to a hostile value (surrogates, huge
numbers, wrong types, 1e999). Anything that loads must also save again and
summarise: the writer accepts what the reader accepts.
"""

import hashlib
import json
import random
import time
from pathlib import Path

import pytest
from conftest import members_of, zip_members

import d3mfmt
from d3mfmt import D3MError
from d3mfmt.summary import check, summarize

VECTORS = sorted((Path(__file__).parent.parent / "spec" / "vectors").glob("*.d3m"))
CASES_PER_VECTOR = 3000
SLOWEST_CASE_S = 2.0


def mutate_bytes(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    """One truncation, flip burst or splice of ``data``."""
    data = bytearray(data)
    kind = rng.choice(("truncate", "flip", "flip", "splice", "insert", "delete", "interesting"))
    pos = rng.randrange(len(data) + 1)
    if kind == "truncate":
        return bytes(data[:pos])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "splice":  # a run of another vector's bytes over ours
        donor = rng.choice(donors)
        start = rng.randrange(len(donor))
        chunk = donor[start : start + rng.randint(1, 64)]
        data[pos : pos + len(chunk)] = chunk
    elif kind == "insert":
        data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete":
        del data[pos : pos + rng.randint(1, 16)]
    else:  # boundary values over 1, 2, 4 or 8 bytes
        width = rng.choice((1, 2, 4, 8))
        value = rng.choice((0, 1, 0x7F, 0x80, 0xFF, (1 << (8 * width)) - 1, 1 << (8 * width - 1)))
        data[pos : pos + width] = value.to_bytes(width, "little")
    return bytes(data)


def mutate_safetensors_header(rng: random.Random, blob: bytes) -> bytes:
    """Rewrite one field of the safetensors header (dtype, shape, offsets, metadata) to a hostile value."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    name = rng.choice(sorted(header))
    entry = header[name]
    field = rng.choice(("dtype", "shape", "data_offsets", "entry", "metadata"))
    hostile = rng.choice(HOSTILE_VALUES + [[1 << 40, 1], [-1, 4], [0, 0], "F64", "I8", "BOOL", [3, 1, 8.0]])
    if field == "entry":
        header[name] = hostile
    elif field == "metadata":
        header["__metadata__"] = hostile
    elif isinstance(entry, dict):
        entry[field] = hostile
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def mutate_member(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    """Mutate one member, then repair CRCs (by re-zipping) and the manifest's size and sha256."""
    entries = members_of(data)
    i = rng.choice((1, 2, 2, 3, 3))
    if i == 2 and rng.random() < 0.5:
        entries[i] = (entries[i][0], mutate_safetensors_header(rng, entries[i][1]))
    else:
        entries[i] = (entries[i][0], mutate_bytes(rng, entries[i][1], donors))
    if i > 1:
        try:
            doc = json.loads(entries[1][1])
            doc["members"][entries[i][0]] = {"size": len(entries[i][1]), "sha256": hashlib.sha256(entries[i][1]).hexdigest()}
            entries[1] = ("manifest.json", json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
        except (ValueError, KeyError, TypeError):
            pass
    return zip_members(entries)


HOSTILE_VALUES = [
    None, True, 0, -1, 1 << 64, 10**300, 0.5, -0.0, 1e308, "", "x" * 5000, "\ud800", "a\udcffb", "\x1b[31m",
    [], {}, [[[[[[[[]]]]]]]], {"a": {"b": {"c": 1}}}, "sde-dpmsolver++", "NotAPipeline", "DDPMScheduler",
]
RAW_NUMBERS = [b"1e999", b"-1e999", b"NaN", b"Infinity", b"1" * 5000, b"1e-999", b"0.1e400"]


def mutate_json(rng: random.Random, data: bytes) -> bytes:
    """Set a random field of the manifest (walking down from the top) to a hostile value, or a number to an overflow."""
    entries = members_of(data)
    raw = entries[1][1]
    if rng.random() < 0.2:
        digits = [i for i in range(len(raw) - 1) if raw[i : i + 1] == b":" and raw[i + 1 : i + 2] in b"0123456789-"]
        pos = rng.choice(digits) + 1
        end = pos
        while end < len(raw) and raw[end : end + 1] in b"0123456789.-+eE":
            end += 1
        raw = raw[:pos] + rng.choice(RAW_NUMBERS) + raw[end:]
    else:
        doc = json.loads(raw)
        node = doc
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = rng.choice(keys + ([rng.choice(["new", "_x", "\ud800"])] if isinstance(node, dict) else []))
            child = node.get(key) if isinstance(node, dict) else node[key]
            if isinstance(child, (dict, list)) and child and rng.random() < 0.75:
                node = child
                continue
            node[key] = rng.choice(HOSTILE_VALUES)
            break
        raw = json.dumps(doc).encode()
    entries[1] = ("manifest.json", raw)
    return zip_members(entries)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda p: p.stem)
def test_mutated_vectors_load_or_raise_d3merror(vector):
    original = vector.read_bytes()
    donors = [v.read_bytes() for v in VECTORS]
    rng = random.Random(f"d3m-fuzz-{vector.stem}")
    loaded = slowest = 0.0
    start = time.monotonic()
    for case in range(CASES_PER_VECTOR):
        mutate = (mutate_bytes, mutate_member, mutate_json)[case % 3]
        data = mutate_json(rng, original) if mutate is mutate_json else mutate(rng, original, donors)
        t0 = time.monotonic()
        try:
            archive = d3mfmt.load(data)
        except D3MError as exc:
            refused = str(exc)
        else:
            refused = None
            loaded += 1
            d3mfmt.save(archive)  # whatever the reader accepts, the writer writes
            json.dumps(summarize(archive, {n: len(b) for n, b in members_of(data)}, len(data)), ensure_ascii=False).encode("utf-8")  # and --json prints
        if case % 10 == 0:  # `d3m-inspect check` agrees with the reader: no problem exactly when it loads
            problems = check(data)
            assert (problems == []) == (refused is None), (case, refused, problems)
            assert all(isinstance(p, str) and p for p in problems)
        slowest = max(slowest, time.monotonic() - t0)
    assert slowest < SLOWEST_CASE_S, f"one case took {slowest:.2f} s"
    assert time.monotonic() - start < 20
    assert loaded < CASES_PER_VECTOR  # the mutations do reach the checks
