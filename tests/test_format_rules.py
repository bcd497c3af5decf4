"""The reader's rules of issue 20 that need no model: numbers, ZIP header fields, the safetensors header,
canonical manifests, the `members` keys, JSON size, and the render-cost bound. One property test per rule."""

import json
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import safetensors.numpy
from conftest import make_archive, members_of, with_manifest, with_member, zip_members
from hypothesis import given, settings
from hypothesis import strategies as st

import d3mfmt
from d3mfmt import D3MFormatError, RenderLimits
from d3mfmt.container import EXTERNAL_ATTR, MADE_BY
from d3mfmt.summary import check, render_text, summarize

HUGE = "9" * 4300


def _raw_manifest(data: bytes, edit) -> bytes:
    entries = members_of(data)
    entries[1] = ("manifest.json", edit(entries[1][1]))
    return zip_members(entries)


def _refused(data: bytes, match: str) -> None:
    with pytest.raises(D3MFormatError, match=match):
        d3mfmt.load(data)
    problems = check(data)
    assert problems and any(__import__("re").search(match, p) for p in problems), problems


# -- numbers: within the double range anywhere, refused with a message, never an OverflowError ----------


@pytest.mark.parametrize("where", [b'"guidance_scale":1.0', b'"eta":0.0', b'"temperature":1.0', b'"build":{}',
                                   b'"num_train_timesteps":1000', b'"ipc":2', b'"steps":4'])
def test_a_4300_digit_integer_is_refused_anywhere(archive_bytes, where):
    key = where.split(b":")[0]
    new = key + b":{\"x\":" + HUGE.encode() + b"}" if where == b'"build":{}' else key + b":" + HUGE.encode()
    data = _raw_manifest(archive_bytes, lambda raw: raw.replace(where, new, 1))
    _refused(data, "integer of 4300 digits is out of range")


def test_numbers_at_the_double_limit(archive_bytes):
    edge = str(int(1.7976931348623157e308)).encode()
    ok = _raw_manifest(archive_bytes, lambda raw: raw.replace(b'"build":{}', b'"build":{"x":' + edge + b',"y":-' + edge + b"}", 1))
    a = d3mfmt.load(ok)
    assert a.manifest.build["x"] == int(1.7976931348623157e308)
    render_text(summarize(a, {"labels.zst": 1}, 1))  # summary and card code see only double-range numbers
    over = _raw_manifest(archive_bytes, lambda raw: raw.replace(b'"build":{}', b'"build":{"x":' + edge[:-1] + b"9}", 1))
    _refused(over, "out of range")


def test_teacher_accuracy_and_in_memory_manifests_are_bounded_too(archive_bytes):
    a = make_archive()
    huge = replace(a.manifest, build={"n": 10**400})
    with pytest.raises(D3MFormatError, match=r"build.n is an integer outside the range of an IEEE double \(401 digits\)"):
        d3mfmt.save(replace(a, manifest=huge))
    big_teacher = replace(a.manifest, teacher=d3mfmt.TeacherInfo("t", None, 10**5000))
    with pytest.raises(D3MFormatError, match="teacher.accuracy"):
        d3mfmt.save(replace(a, manifest=big_teacher))


@settings(max_examples=80, deadline=None)
@given(digits=st.integers(300, 6000), negative=st.booleans(), slot=st.sampled_from(["build", "config", "guidance", "list"]))
def test_fuzz_integers_beyond_the_double_range_are_refused(digits, negative, slot):
    data = d3mfmt.save(make_archive())
    value = ("-" if negative else "") + "1" + "0" * (digits - 1)
    fits = digits <= 309  # 10**308 is a double; 10**309 is not
    new = {"build": (b'"build":{}', b'"build":{"a":[1,{"b":' + value.encode() + b"}]}"),
           "config": (b'"num_train_timesteps":1000', b'"num_train_timesteps":1000,"beta_start":' + value.encode()),
           "guidance": (b'"guidance_scale":1.0', b'"guidance_scale":' + value.encode()),
           "list": (b'"build":{}', b'"build":{"l":[' + (value.encode() + b",") * 3 + b"0]}")}[slot]
    raw = _raw_manifest(data, lambda r: r.replace(new[0], new[1], 1))
    try:
        d3mfmt.load(raw)
        loaded = True
    except D3MFormatError as exc:
        loaded = False
        assert "out of range" in str(exc) or fits, str(exc)
    assert not loaded or (fits and slot in ("build", "list"))
    assert bool(check(raw)) != loaded


# -- the ZIP header fields SPEC fixes --------------------------------------------------


def _patch_central(data: bytes, member: int, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with one field of the ``member``-th central-directory entry overwritten."""
    pos = data.index(b"PK\x01\x02")
    for _ in range(member):
        name_len, extra, comment = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + name_len + extra + comment
    return data[: pos + offset] + struct.pack(fmt, value) + data[pos + offset + struct.calcsize(fmt):]


@pytest.mark.parametrize("mode, kind", [(0o120777, "a symlink"), (0o100777, "a regular file"), (0o040755, "not a regular")])
def test_symlink_and_executable_modes_are_refused(archive_bytes, mode, kind):
    for member in range(4):
        _refused(_patch_central(archive_bytes, member, 38, "<I", mode << 16), f"external attributes .*{kind}")


@settings(max_examples=120, deadline=None)
@given(member=st.integers(0, 3), field=st.sampled_from(["made_by", "internal", "external"]),
       value=st.integers(0, 0xFFFFFFFF))
def test_fuzz_header_fields_other_than_the_fixed_ones_are_refused(member, field, value):
    data = d3mfmt.save(make_archive())
    offset, fmt, fixed = {"made_by": (4, "<H", MADE_BY), "internal": (36, "<H", 0), "external": (38, "<I", EXTERNAL_ATTR)}[field]
    value &= 0xFFFF if fmt == "<H" else 0xFFFFFFFF
    patched = _patch_central(data, member, offset, fmt, value)
    if value == fixed:
        assert d3mfmt.load(patched).content_hash == d3mfmt.load(data).content_hash
    else:
        with pytest.raises(D3MFormatError, match="ZIP container: member"):
            d3mfmt.load(patched)


def test_dates_and_version_needed_are_fixed(archive_bytes):
    for member in (0, 3):
        _refused(_patch_central(archive_bytes, member, 14, "<H", 0x5821), "DOS date 0x5821")
        _refused(_patch_central(archive_bytes, member, 6, "<H", 45), "version needed 0x2d|version needed")


# -- the safetensors header: refused from its declared length, parsed only when small ------------------


def test_a_huge_header_is_refused_before_it_is_parsed(archive_bytes, monkeypatch):
    import d3mfmt.tensors

    raw = members_of(archive_bytes)[2][1]
    n = struct.unpack("<Q", raw[:8])[0]
    bomb_header = raw[8 : 8 + n - 1] + b',"__metadata__":{"x":[' + b"[]," * (8 << 20) + b"[]]}}"
    bomb = struct.pack("<Q", len(bomb_header)) + bomb_header + raw[8 + n :]
    data = with_member(archive_bytes, "tensors.safetensors", bomb)

    def never(*args, **kwargs):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(d3mfmt.tensors, "loads", never)
    problems = check(data)
    assert len(problems) == 1 and "header length 25,16" in problems[0] and "refused unread" in problems[0], problems


@settings(max_examples=60, deadline=None)
@given(declared=st.integers(64 << 10, (1 << 64) - 1) | st.just((64 << 10) + 1))
def test_fuzz_declared_header_lengths_over_the_bound_are_refused(declared):
    data = d3mfmt.save(make_archive())
    raw = members_of(data)[2][1]
    forged = struct.pack("<Q", declared) + raw[8:]
    problems = check(with_member(data, "tensors.safetensors", forged))
    assert problems and "header length" in problems[0], problems


def _mutate_header(rng, header: dict) -> dict:
    header = json.loads(json.dumps(header))
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    kind = rng.choice(["offset", "offset", "shape", "dtype", "extra_key", "metadata", "swap"])
    entry = header[name]
    if kind == "offset":
        i = rng.randrange(2)
        entry["data_offsets"][i] = max(0, entry["data_offsets"][i] + rng.choice([-8, -1, 1, 8, 64]))
    elif kind == "shape":
        entry["shape"] = [max(0, d + rng.choice([-1, 1])) for d in entry["shape"]]
    elif kind == "dtype":
        entry["dtype"] = rng.choice(["F16", "F32", "I64", "U8", "BF16", "I8"])
    elif kind == "extra_key":
        entry["extra"] = 1
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"a": 1}, [], {"k": "v" * 10}])
    else:
        a, b = (k for k in header if k != "__metadata__" and k != name), name
        a = next(iter(a))
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return header


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_fuzz_whatever_the_tensor_reader_accepts_safetensors_accepts_identically(seed):
    import random

    rng = random.Random(seed)
    a = make_archive()
    data = d3mfmt.save(a)
    raw = members_of(data)[2][1]
    n = struct.unpack("<Q", raw[:8])[0]
    header = _mutate_header(rng, json.loads(raw[8 : 8 + n]))
    blob = json.dumps(header).encode()
    member = struct.pack("<Q", len(blob)) + blob + raw[8 + n :]
    try:
        got = d3mfmt.load(with_member(data, "tensors.safetensors", member))
    except D3MFormatError:
        return
    theirs = safetensors.numpy.load(member)  # the reference library reads the same bytes the same way
    np.testing.assert_array_equal(theirs["embeddings"], got.embeddings)
    np.testing.assert_array_equal(theirs["seeds"], got.seeds)
    np.testing.assert_array_equal(theirs["fingerprints"], got.fingerprints)


def test_tensors_are_read_without_a_copy_of_the_member(archive_bytes, monkeypatch):
    # the old reader did safetensors.numpy.load(bytes(member)): a full extra copy of every archive's tensors
    import d3mfmt.tensors
    from d3mfmt.container import MANIFEST, TENSORS, read_zip

    members = read_zip(archive_bytes)
    manifest = d3mfmt.Manifest.from_json(members[MANIFEST])
    seen = []
    real = np.frombuffer
    monkeypatch.setattr(d3mfmt.tensors.np, "frombuffer", lambda buf, **kw: seen.append(type(buf)) or real(buf, **kw))
    tensors = d3mfmt.tensors.parse_tensors(manifest, members[TENSORS])
    assert seen and all(t is memoryview for t in seen), seen  # views into the archive's bytes, then one copy each
    member = real(members[TENSORS], np.uint8)
    assert all(t.flags.writeable and not np.shares_memory(t, member) for t in tensors.values())


# -- canonical manifests: save(load(save(x))) == save(x), and one content hash ---------------------------

json_leaf = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=8), st.booleans(), st.none())
json_tree = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                         max_leaves=20)


@settings(max_examples=80, deadline=None)
@given(guidance=st.integers(0, 100) | st.floats(0, 100), eta=st.just(0) | st.just(0.0),
       temperature=st.integers(1, 1000) | st.floats(1e-6, 1e6), accuracy=st.none() | st.integers(0, 1) | st.floats(0, 1),
       build=st.dictionaries(st.text(max_size=6), json_tree, max_size=4),
       beta=st.sampled_from([0.00085, 0.001, 0.02]))
def test_fuzz_manifests_made_in_code_are_canonical(guidance, eta, temperature, accuracy, build, beta):
    a = make_archive()
    m = a.manifest
    gen = replace(m.generator, guidance_scale=guidance, eta=eta,
                  scheduler_config={"num_train_timesteps": 1000, "beta_start": beta, "clip_sample": False})
    labels = replace(m.labels, temperature=temperature)
    teacher = d3mfmt.TeacherInfo("t", None, accuracy)
    x = replace(a, manifest=replace(m, generator=gen, labels=labels, teacher=teacher, build=build),
                labels=replace(a.labels, encoding=labels))
    first = d3mfmt.save(x)
    again = d3mfmt.load(first)
    assert d3mfmt.save(again) == first
    assert x.content_hash == again.content_hash
    assert isinstance(x.manifest.generator.guidance_scale, float) and isinstance(x.manifest.labels.temperature, float)


def test_guidance_one_as_an_int_hashes_like_the_reload():
    a = make_archive()
    x = replace(a, manifest=replace(a.manifest, generator=replace(a.manifest.generator, guidance_scale=1)))
    y = d3mfmt.load(d3mfmt.save(x))
    assert x.content_hash == y.content_hash and d3mfmt.save(y) == d3mfmt.save(x)
    assert b'"guidance_scale":1.0' in members_of(d3mfmt.save(x))[1][1]
    with pytest.raises(D3MFormatError, match="guidance_scale"):  # a bool is not made a float
        d3mfmt.save(replace(a, manifest=replace(a.manifest, generator=replace(a.manifest.generator, guidance_scale=True))))


# -- `members`: exactly the payload names ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(name=st.text(min_size=1, max_size=20))
def test_fuzz_members_other_than_the_payload_names_are_refused(name):
    data = d3mfmt.save(make_archive())
    edited = with_manifest(data, lambda d: d["members"].__setitem__(name, {"size": 1, "sha256": "0" * 64}))
    if name in ("tensors.safetensors", "labels.zst"):
        assert check(edited)  # a wrong size/hash for a real member
    else:
        with pytest.raises(D3MFormatError, match="members may hold only"):
            d3mfmt.load(edited)


# -- JSON size: objects and arrays are bounded before parsing ---------------------------------------


def test_a_manifest_of_a_million_empty_arrays_is_refused_before_parsing(archive_bytes):
    data = _raw_manifest(archive_bytes, lambda raw: raw.replace(b'"build":{}', b'"build":{"x":[' + b"[]," * 1_000_001 + b"[]]}", 1))
    _refused(data, "objects and arrays, over the limit of 1,000,000")


# -- render cost: the check refuses exactly what the limits exclude, counted with diffusers' own timesteps ---


@settings(max_examples=60, deadline=None)
@given(cls=st.sampled_from(["DDIMScheduler", "HeunDiscreteScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                            "DPMSolverMultistepScheduler"]),
       steps=st.integers(4, 999), side=st.sampled_from([64, 256, 512, 768, 1024, 2048]),
       guidance=st.sampled_from([1.0, 7.5]), images=st.sampled_from([1, 10, 1000, 10**6]))
def test_fuzz_render_cost_is_refused_exactly_over_the_limits(cls, steps, side, guidance, images):
    import diffusers

    from d3mfmt.renderable import DEFAULT_RENDER_LIMITS as L
    from d3mfmt.renderable import check_render_cost

    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sched = getattr(diffusers, cls).from_config(config)
    sched.set_timesteps(steps)
    evaluations = len(sched.timesteps) * (2 if guidance > 1 else 1)
    latent = (side // 8) ** 2
    within = (evaluations <= L.evaluations and latent <= L.latent_pixels and evaluations * latent <= L.per_image
              and evaluations * latent * images <= L.total)
    a = make_archive()
    gen = replace(a.manifest.generator, model=d3mfmt.ModelRef("org/sd"), scheduler=cls, scheduler_config=config,
                  steps=steps, guidance_scale=guidance, height=side, width=side, latent_shape=(4, side // 8, side // 8))
    classes = tuple(d3mfmt.ClassInfo(f"c{i}", f"c{i}") for i in range(min(images, 1000)))
    ds = replace(a.manifest.dataset, classes=classes, ipc=max(1, images // len(classes)), grid=1)
    manifest = replace(a.manifest, generator=gen, dataset=ds)
    try:
        check_render_cost(manifest)
        accepted = True
    except D3MFormatError as exc:
        accepted = False
        assert "render_limits=RenderLimits(" in str(exc)
    assert accepted == within, (cls, steps, side, guidance, images, evaluations)
    check_render_cost(manifest, RenderLimits(evaluations=None, latent_pixels=None, per_image=None, total=None))


def test_render_limits_are_checked_values():
    with pytest.raises(D3MFormatError, match="RenderLimits.total must be a positive integer or None"):
        RenderLimits(total=0)
    with pytest.raises(D3MFormatError, match="RenderLimits.evaluations"):
        RenderLimits(evaluations=True)
    assert RenderLimits.for_model(64) == RenderLimits()


def test_crc_is_untouched_by_the_patch_helper(archive_bytes):
    # the helper edits central-directory fields only, so each refusal above is the field's, not a CRC's
    patched = _patch_central(archive_bytes, 2, 38, "<I", EXTERNAL_ATTR)
    assert patched == archive_bytes and zlib.crc32(patched) == zlib.crc32(archive_bytes)


def test_a_renderer_bounds_a_copied_small_model_by_its_own_size():
    # an archive naming a copy of d3m/tiny-mnist by another path gets the SD 1.x defaults from the reader;
    # the renderer, which knows the UNet it loaded (sample_size 8), applies that model's own limits
    from d3mfmt.renderable import check_cost

    a = make_archive()
    gen = replace(a.manifest.generator, model=d3mfmt.ModelRef("/somewhere/else/tiny-mnist-copy"), height=512, width=512,
                  latent_shape=(4, 128, 128), steps=1, guidance_scale=1.0)
    check_cost(gen, 1)  # within the defaults
    with pytest.raises(D3MFormatError, match="16,384 latent pixels per image.*limit of 256"):
        check_cost(gen, 1, RenderLimits.for_model(8))


def test_spec_schema_and_reader_list_the_same_scheduler_keys():
    import re
    from pathlib import Path

    from d3mfmt.schedulers import SCHEDULER_KEYS

    spec = Path(__file__).parent.parent / "spec"
    schema = json.loads((spec / "manifest.schema.json").read_text())["properties"]["generator"]["properties"]["scheduler"]
    assert schema["properties"]["class"]["enum"] == list(SCHEDULER_KEYS)
    per_class = {rule["if"]["properties"]["class"]["const"]: rule["then"]["properties"]["config"]["propertyNames"]["enum"]
                 for rule in schema["allOf"]}
    assert per_class == {name: sorted(rules) for name, rules in SCHEDULER_KEYS.items()}
    text = (spec / "SPEC.md").read_text()
    table = text[text.index("| key | allowed | taken by |"): text.index("`lambda_min_clipped` is not allowed")]
    listed = set(re.findall(r"^\| ([^|]+) \|", table, re.M)[1:])  # [0] is the header
    keys_in_spec = {k for cell in listed for k in re.findall(r"`([a-z_0-9]+)`", cell)}
    assert keys_in_spec == {k for rules in SCHEDULER_KEYS.values() for k in rules}
