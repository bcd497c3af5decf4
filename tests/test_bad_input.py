"""The reader rejects every kind of broken archive with D3MFormatError naming the problem."""

import json
import struct
import zipfile

import numpy as np
import pytest
import safetensors.numpy
from conftest import make_archive, members_of, with_manifest, with_member, zip_members

import d3mfmt
from d3mfmt import D3MFormatError
from d3mfmt.summary import check


def rejects(data: bytes, match: str):
    with pytest.raises(D3MFormatError, match=match):
        d3mfmt.load(data)


def test_truncated_at_every_offset(archive_bytes):
    # every prefix: mostly caught by the magic check or the ZIP directory
    for cut in range(0, len(archive_bytes), 7):
        with pytest.raises(D3MFormatError):
            d3mfmt.load(archive_bytes[:cut])


def test_every_single_byte_flip_is_caught_or_harmless(archive_bytes):
    # a flipped byte either fails loudly or (in ZIP padding fields the reader
    # ignores) leaves the decoded content identical
    ref = d3mfmt.load(archive_bytes)
    for pos in range(len(archive_bytes)):
        data = bytearray(archive_bytes)
        data[pos] ^= 0x55
        try:
            a = d3mfmt.load(bytes(data))
        except D3MFormatError:
            continue
        assert a.content_hash == ref.content_hash
        np.testing.assert_array_equal(a.labels.dense(), ref.labels.dense())


def test_wrong_magic_and_mimetype(archive_bytes):
    rejects(b"GIF89a" + archive_bytes[6:], "not a .d3m archive")
    rejects(b"", "not a .d3m archive")
    entries = members_of(archive_bytes)
    entries[0] = ("mimetype", b"application/zip")
    rejects(zip_members(entries), "mimetype is not")
    rejects(zip_members(entries[1:]), "not a .d3m archive")


def test_deflated_member(archive_bytes):
    rejects(zip_members(members_of(archive_bytes), zipfile.ZIP_DEFLATED), "must be STORED")


def test_missing_extra_duplicate_and_traversal_members(archive_bytes):
    entries = members_of(archive_bytes)
    rejects(zip_members(entries[:3]), "members must be exactly")
    rejects(zip_members(entries + [("extra.bin", b"x")]), "unexpected member 'extra.bin'")
    rejects(zip_members(entries + [("../../etc/passwd", b"x")]), "unexpected member '../../etc/passwd'")
    with pytest.warns(UserWarning):  # zipfile warns about the duplicate name it writes
        dup = zip_members(entries + [entries[3]])
    rejects(dup, "duplicate member names")
    rejects(zip_members([entries[0], entries[2], entries[1], entries[3]]), "in that order")


def test_invalid_json_and_non_object(archive_bytes):
    entries = members_of(archive_bytes)
    for bad, msg in [(b"{not json", "not valid UTF-8 JSON"), (b"\xff\xfe", "not valid UTF-8 JSON"),
                     (b"[1, 2]", "top level must be an object"), (b'{"x": NaN}', "not valid UTF-8 JSON")]:
        entries[1] = ("manifest.json", bad)
        rejects(zip_members(entries), msg)


def _set(path, value):
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, msg",
    [
        (("format",), "zip", "format must be 'd3m'"),
        (("version",), "2.0", "major version 2 is not supported"),
        (("version",), "1", "version must look like"),
        (("dataset", "ipc"), -3, r"dataset.ipc must be an integer in 1\.\.10000, got -3"),
        (("dataset", "ipc"), 10**12, "dataset.ipc must be an integer"),
        (("dataset", "ipc"), True, "dataset.ipc must be an integer"),
        (("dataset", "ipc"), _DELETE, "missing required field dataset.ipc"),
        (("dataset", "grid"), 0, "dataset.grid"),
        (("dataset", "classes"), [], "dataset.classes must be a list"),
        (("dataset", "classes", 0, "id"), 5, r"dataset.classes\[0\].id must be a string"),
        (("generator", "steps"), 2.5, "generator.steps"),
        (("generator", "guidance_scale"), "high", "generator.guidance_scale"),
        (("generator", "eta"), 1.0, "generator.eta"),
        (("generator", "latent_shape"), [4, 8], "generator.latent_shape"),
        (("generator", "rng"), "numpy", "generator.rng must be one of"),
        (("generator", "dtype"), "int8", "generator.dtype"),
        (("generator", "prompt_template"), "a photo", "must contain generator.placeholder"),
        (("generator", "height"), 33, "divisible by dataset.grid"),
        (("embeddings", "dim"), 0, "embeddings.dim"),
        (("embeddings", "dtype"), "bfloat16", "embeddings.dtype"),
        (("labels", "encoding"), "magic", "labels.encoding must be one of"),
        (("labels", "k"), 99, r"k must be in 1\.\.3"),
        (("members",), _DELETE, "missing required field members"),
        (("members", "labels.zst", "sha256"), "XYZ", "sha256 must be 64 lowercase hex"),
        (("members", "labels.zst", "size"), -1, "members.labels.zst.size"),
        (("fingerprints", "size"), 3, "must divide generator.height"),
    ],
)
def test_schema_violations_name_the_field(archive_bytes, path, value, msg):
    rejects(with_manifest(archive_bytes, _set(path, value)), msg)


def test_duplicate_class_ids(archive_bytes):
    rejects(with_manifest(archive_bytes, lambda d: d["dataset"]["classes"][1].update(id="c0")), "ids must be unique")


def test_unknown_keys_and_minor_versions_are_accepted(archive_bytes):
    def mutate(doc):
        doc["version"] = "1.7"
        doc["future_field"] = {"anything": [1, 2]}
        doc["generator"]["new_knob"] = 3

    a = d3mfmt.load(with_manifest(archive_bytes, mutate))
    assert a.manifest.version == (1, 7)


def test_sha256_and_size_mismatch(archive_bytes):
    entries = members_of(archive_bytes)
    tampered = bytearray(entries[3][1])
    tampered[-1] ^= 1
    rejects(with_member(archive_bytes, "labels.zst", bytes(tampered), fix_hash=False), "labels.zst: sha256")
    rejects(with_member(archive_bytes, "labels.zst", bytes(tampered) + b"x", fix_hash=False), "bytes, the manifest says")


def _tensors(**arrays) -> bytes:
    return safetensors.numpy.save(arrays)


def test_tensor_dtype_shape_and_set_mismatch(archive_bytes):
    a = d3mfmt.load(archive_bytes)
    good = {"embeddings": a.embeddings, "seeds": a.seeds, "fingerprints": a.fingerprints}
    cases = [
        ({**good, "embeddings": a.embeddings.astype(np.float32)}, "tensor 'embeddings' is F32"),
        ({**good, "seeds": a.seeds[:, :1].copy()}, r"tensor 'seeds' is I64 \[3, 1\]"),
        ({k: v for k, v in good.items() if k != "fingerprints"}, "holds tensors"),
        ({**good, "extra": a.seeds}, "holds tensors"),
    ]
    for tensors, msg in cases:
        rejects(with_member(archive_bytes, "tensors.safetensors", _tensors(**tensors)), msg)


def test_nan_inf_embeddings_and_negative_seeds(archive_bytes):
    a = d3mfmt.load(archive_bytes)
    for bad in (np.nan, np.inf):
        emb = a.embeddings.copy()
        emb[1, 0, 2] = bad
        data = _tensors(embeddings=emb, seeds=a.seeds, fingerprints=a.fingerprints)
        rejects(with_member(archive_bytes, "tensors.safetensors", data), "NaN or Inf")
    seeds = a.seeds.copy()
    seeds[0, 0] = -5
    data = _tensors(embeddings=a.embeddings, seeds=seeds, fingerprints=a.fingerprints)
    rejects(with_member(archive_bytes, "tensors.safetensors", data), "seeds must be in")


def test_safetensors_header_lies(archive_bytes):
    raw = bytearray(members_of(archive_bytes)[2][1])
    huge = bytes(raw)
    huge = struct.pack("<Q", 1 << 60) + huge[8:]
    rejects(with_member(archive_bytes, "tensors.safetensors", huge), "header length")
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    header["seeds"]["data_offsets"][1] += 8  # points past the buffer
    blob = json.dumps(header).encode()
    forged = struct.pack("<Q", len(blob)) + blob + bytes(raw[8 + header_len :])
    rejects(with_member(archive_bytes, "tensors.safetensors", forged), "data offsets")
    rejects(with_member(archive_bytes, "tensors.safetensors", b"\x01"), "truncated")


def test_label_index_out_of_range_via_archive():
    import zstandard

    src = make_archive(num_classes=3, encoding=d3mfmt.LabelEncoding("topk", 2, "u8sqrt"))
    data = d3mfmt.save(src)
    rows = src.manifest.dataset.num_patches
    payload = bytearray(src.labels.payload())
    payload[0] = 3  # first index of the first row
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(payload))
    rejects(with_member(data, "labels.zst", frame), "class index 3 >= number of classes 3")
    assert rows == 24


def test_overflowing_counts_are_bounded_before_allocation(archive_bytes):
    import tracemalloc

    def mutate(doc):
        doc["dataset"]["ipc"] = 10_000
        doc["dataset"]["grid"] = 16
        doc["dataset"]["classes"] = [{"id": str(i), "name": str(i)} for i in range(30_000)]

    data = with_manifest(archive_bytes, mutate)
    tracemalloc.start()
    rejects(data, "exceeds")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20


def test_manifest_size_cap(archive_bytes):
    entries = members_of(archive_bytes)
    entries[1] = ("manifest.json", b" " * ((16 << 20) + 1))
    rejects(zip_members(entries), "exceeds the limit")


def test_errors_are_value_errors_from_one_root():
    assert issubclass(D3MFormatError, d3mfmt.D3MError) and issubclass(d3mfmt.D3MError, ValueError)
    assert issubclass(d3mfmt.D3MModelError, d3mfmt.D3MError)


def test_load_file_errors(tmp_path):
    with pytest.raises(D3MFormatError, match="no such file"):
        d3mfmt.load_file(tmp_path / "nope.d3m")
    with pytest.raises(D3MFormatError, match="is a directory"):
        d3mfmt.load_file(tmp_path)


def test_topk_without_k_and_oversized_header_integers(archive_bytes):
    rejects(with_manifest(archive_bytes, _set(("labels", "k"), None)), "labels.k must be an integer for topk")
    rejects(with_manifest(archive_bytes, _set(("labels", "k"), _DELETE)), "labels.k must be an integer for topk")
    raw = members_of(archive_bytes)[2][1]
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + header_len].replace(b'"shape":[', b'"shape":[' + b"9" * 5000 + b",", 1)
    forged = struct.pack("<Q", len(header)) + header + raw[8 + header_len :]
    rejects(with_member(archive_bytes, "tensors.safetensors", forged), "header is not valid JSON")


# -- the generator section: what rendering would refuse, --check refuses -------


@pytest.mark.parametrize(
    "key, value, msg",
    [
        ("num_train_timesteps", 200_000_000, r"num_train_timesteps must be an integer in 1000\.\.1000"),
        ("num_train_timesteps", 1e10, "num_train_timesteps must be an integer"),
        ("beta_schedule", "bogus", "beta_schedule must be one of"),
        ("prediction_type", "bogus", "prediction_type must be one of"),
        ("timestep_spacing", "bogus", "timestep_spacing must be one of"),
        ("algorithm_type", "sde-dpmsolver++", "DDIMScheduler does not take in format 1.0"),
        ("beta_end", 1.5, "beta_end must be a number"),
        ("steps_offset", 999, "steps_offset must be small enough"),
        ("trained_betas", [0.1] * 3, "trained_betas must be null"),
        ("solver_p", None, "has key 'solver_p', which DDIMScheduler does not take"),
        ("clip_sample", 1, "clip_sample must be true or false"),
        ("not_a_knob", 1, "has key 'not_a_knob'"),
        ("_class_name", "DDIMScheduler", "private key '_class_name'"),
        ("_use_default_values", ["beta_start"], "private key '_use_default_values'"),
    ],
)
def test_scheduler_config_is_checked_key_by_key(archive_bytes, key, value, msg):
    rejects(with_manifest(archive_bytes, _set(("generator", "scheduler", "config", key), value)), msg)
    assert check(with_manifest(archive_bytes, _set(("generator", "scheduler", "config", key), value)))


def test_scheduler_cross_field_rules(archive_bytes):
    both = {"num_train_timesteps": 1000, "use_karras_sigmas": True, "use_exponential_sigmas": True}
    euler = with_manifest(archive_bytes, _set(("generator", "scheduler", "class"), "EulerDiscreteScheduler"))
    rejects(with_manifest(euler, _set(("generator", "scheduler", "config"), both)), "at most one of")
    few = {"num_train_timesteps": 3}
    rejects(with_manifest(archive_bytes, _set(("generator", "scheduler", "config"), few)), "num_train_timesteps must be an integer in 1000")
    multistep = with_manifest(archive_bytes, _set(("generator", "scheduler", "class"), "DPMSolverMultistepScheduler"))
    rejects(with_manifest(multistep, _set(("generator", "steps"), 1000)), "must be below 1000, the scheduler's num_train")


@pytest.mark.parametrize(
    "path, value, msg",
    [
        (("generator", "scheduler", "class"), "DDPMScheduler", "must be a deterministic scheduler"),
        (("generator", "scheduler", "class"), "EulerAncestralDiscreteScheduler", "must be a deterministic scheduler"),
        (("generator", "pipeline"), "NotAPipeline", r"generator.pipeline must be one of \['StableDiffusionPipeline'\]"),
    ],
)
def test_pipeline_and_scheduler_class_come_from_the_spec_lists(archive_bytes, path, value, msg):
    rejects(with_manifest(archive_bytes, _set(path, value)), msg)


def test_writer_refuses_a_bad_generator_too():
    from dataclasses import replace

    a = make_archive()
    for gen, msg in [
        (replace(a.manifest.generator, scheduler_config={"num_train_timesteps": 10**10}), "num_train_timesteps"),
        (replace(a.manifest.generator, scheduler="DDPMScheduler"), "deterministic scheduler"),
        (replace(a.manifest.generator, pipeline="NotAPipeline"), "generator.pipeline"),
    ]:
        with pytest.raises(D3MFormatError, match=msg):
            d3mfmt.save(replace(a, manifest=replace(a.manifest, generator=gen)))


# -- JSON that two readers could read differently, or that cannot be written back


def _raw_manifest(data: bytes, edit) -> bytes:
    entries = members_of(data)
    entries[1] = ("manifest.json", edit(entries[1][1]))
    return zip_members(entries)


@pytest.mark.parametrize(
    "path",
    [
        ("dataset", "classes", 0, "name"),
        ("dataset", "name"),
        ("build", "tool"),
        ("generator", "scheduler", "config", "_class_name"),
        ("generator", "prompt_template"),
    ],
)
def test_unpaired_surrogates_are_refused_anywhere(archive_bytes, path):
    value = "a photo of {token} \ud800" if path[-1] == "prompt_template" else "x\ud800"
    data = with_manifest(archive_bytes, _set(path, value))  # json.dumps escapes it as \ud800
    rejects(data, "unpaired surrogate")
    assert any("unpaired surrogate" in p for p in check(data))


def test_surrogate_keys_and_writer_side(archive_bytes):
    rejects(with_manifest(archive_bytes, _set(("build", "\udcff"), 1)), "unpaired surrogate")
    from dataclasses import replace

    a = make_archive()
    with pytest.raises(D3MFormatError, match="unpaired surrogate"):
        d3mfmt.save(replace(a, manifest=replace(a.manifest, build={"note": "\udcff"})))
    with pytest.raises(D3MFormatError, match="unpaired surrogate"):
        d3mfmt.save(replace(a, manifest=replace(a.manifest, dataset=replace(a.manifest.dataset, name="\ud800"))))


def test_a_class_from_a_folder_name_that_is_not_utf8_is_refused():
    import os

    from d3mfmt import ClassInfo

    name = os.fsdecode(b"caf\xe9")  # how Python hands over a Latin-1 folder name
    with pytest.raises(D3MFormatError, match=r"class id contains the unpaired surrogate '\\udce9'"):
        ClassInfo(name, name)


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"1E400"])
def test_numbers_that_overflow_to_infinity_are_refused(archive_bytes, number):
    def edit(raw):
        return raw.replace(b'"guidance_scale":1.0', b'"guidance_scale":' + number, 1)

    assert b'"guidance_scale":1.0' in members_of(archive_bytes)[1][1]
    rejects(_raw_manifest(archive_bytes, edit), "not a finite double")
    build = _raw_manifest(archive_bytes, lambda raw: raw.replace(b'"build":{}', b'"build":{"x":' + number + b"}", 1))
    rejects(build, "not a finite double")


def test_duplicate_keys_are_refused(archive_bytes):
    rejects(_raw_manifest(archive_bytes, lambda raw: b'{"format":"zip",' + raw[1:]), "duplicate key 'format'")
    nested = _raw_manifest(archive_bytes, lambda raw: raw.replace(b'"ipc":2', b'"ipc":2,"ipc":3', 1))
    rejects(nested, "duplicate key 'ipc'")


def test_deep_nesting_is_refused_without_recursion_errors(archive_bytes):
    for depth in (40, 100_000):
        nest = b"[" * depth + b"]" * depth
        data = _raw_manifest(archive_bytes, lambda raw: raw.replace(b'"build":{}', b'"build":{"x":' + nest + b"}", 1))
        rejects(data, "nests deeper than 32|not valid UTF-8 JSON")


def test_soft_label_indices_are_bounded(archive_bytes):
    a = d3mfmt.load(archive_bytes)  # 3 classes, ipc 2, 2x2 grid
    assert a.soft_label(2, 1, 3).shape == (3,)
    for c, i, j in [(0, 0, 4), (0, 2, 0), (3, 0, 0), (-1, 0, 0), (0, 0, -1), (0, 0, 1.0), (True, 0, 0)]:
        with pytest.raises(d3mfmt.D3MError, match="soft_label"):
            a.soft_label(c, i, j)


def test_safetensors_header_with_duplicate_keys(archive_bytes):
    raw = members_of(archive_bytes)[2][1]
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + header_len]
    seeds = json.loads(header)["seeds"]
    fake = json.dumps({**seeds, "shape": [1, 1]}, separators=(",", ":")).encode()
    forged_header = b'{"seeds":' + fake + b"," + header[1:]  # a second "seeds" entry; json keeps the last one
    forged_header += b" " * ((8 - len(forged_header) % 8) % 8)
    forged = struct.pack("<Q", len(forged_header)) + forged_header + raw[8 + header_len :]
    rejects(with_member(archive_bytes, "tensors.safetensors", forged), "duplicate key 'seeds'")


# -- memory bombs inside the limits: peak RSS of d3m-inspect check -------------


def _bomb(classes: int, ipc: int, grid: int, encoding, frame: bytes) -> bytes:
    """A small archive whose manifest and tensors declare ``classes`` x ``ipc`` and whose labels are ``frame``."""
    import hashlib

    rng = np.random.default_rng(0)
    tensors = _tensors(
        embeddings=rng.normal(size=(classes, 1, 8)).astype(np.float16),
        seeds=np.arange(classes * ipc, dtype=np.int64).reshape(classes, ipc),
        fingerprints=np.zeros((classes, ipc, 4, 4), dtype=np.uint8),
    )

    def mutate(doc):
        doc["dataset"].update(ipc=ipc, grid=grid, classes=[{"id": f"c{i}", "name": f"c{i}"} for i in range(classes)])
        doc["generator"].update(height=16 * grid, width=16 * grid, latent_shape=[4, 4 * grid, 4 * grid])
        doc["labels"].update(encoding=encoding.kind, k=encoding.k, values=encoding.values)
        for name, blob in (("tensors.safetensors", tensors), ("labels.zst", frame)):
            doc["members"][name] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

    entries = members_of(d3mfmt.save(make_archive()))
    entries[2], entries[3] = ("tensors.safetensors", tensors), ("labels.zst", frame)
    return with_manifest(zip_members(entries), mutate)


def _inspect_check_peak(path) -> tuple[int, str, int]:
    """(exit code, stdout + stderr, peak RSS in MiB) of ``d3m-inspect check path`` in a fresh interpreter."""
    import subprocess
    import sys

    code = (  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's across exec)
        "import sys\n"
        "from d3mfmt.cli import inspect_main\n"
        "try:\n    inspect_main(['check', sys.argv[1]])\n"
        "finally:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "    print('PEAK', int(hwm) >> 10, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    peak = int(out.stderr.rsplit("PEAK", 1)[1].split()[0])
    return out.returncode, out.stdout + out.stderr, peak


_PROC = pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="peak RSS via /proc (Linux)")


@_PROC
def test_two_gib_dense_label_bomb_is_refused_in_bounded_memory(tmp_path):
    import zstandard

    # the review's 121 KB archive: 1,448 classes, dense f32, a 2 GiB payload in an ordinary zstd frame
    enc = d3mfmt.LabelEncoding("dense", None, "f32")
    size = enc.payload_size(1448 * 256, 1448)
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    chunk = b"\x3c" * (1448 * 4 * 2048)  # 2,048 rows of 0.0115 everywhere
    frame = b"".join(cobj.compress(chunk) for _ in range(size // len(chunk))) + cobj.flush()
    path = tmp_path / "bomb.d3m"
    path.write_bytes(_bomb(1448, 1, 16, enc, frame))
    assert path.stat().st_size < 200_000
    code, err, peak = _inspect_check_peak(path)
    assert code == 1 and "exceeds this reader's cap" in err and "Traceback" not in err, err
    assert peak < 300, peak  # MiB: the interpreter and the archive, nothing sized by the payload


@_PROC
def test_topk_k_equals_c_table_at_the_cap_decodes_near_its_size(tmp_path):
    import zstandard

    # 1,448 classes, k = C, f16: 46,336 rows of 5,792 bytes = 256 MiB, just under the default cap
    classes, ipc, grid = 1448, 8, 2
    enc = d3mfmt.LabelEncoding("topk", classes, "f16")
    rows = classes * ipc * grid * grid
    size = enc.payload_size(rows, classes)
    assert size <= 256 << 20  # the default cap
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    block = 256  # rows per chunk; 46,336 = 181 x 256
    parts = [cobj.compress(np.tile(np.arange(classes, dtype="<u2"), block).tobytes()) for _ in range(rows // block)]
    parts += [cobj.compress(np.full(classes * block, 0x1C00, dtype="<u2").tobytes()) for _ in range(rows // block)]
    frame = b"".join(parts) + cobj.flush()
    path = tmp_path / "topk.d3m"
    path.write_bytes(_bomb(classes, ipc, grid, enc, frame))
    code, err, peak = _inspect_check_peak(path)
    assert code == 0 and "topk.d3m: valid" in err, err
    assert peak < size / (1 << 20) + 200, peak  # MiB: the table plus the interpreter, not 2.4 GiB


@_PROC
def test_a_large_member_is_read_once_not_copied(tmp_path, archive_bytes):
    # a 200 MiB labels member with a valid CRC: refused by its size, with the file read once and no member copies
    path, size = tmp_path / "big.d3m", 200 << 20
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members_of(archive_bytes):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system, info.external_attr = 3, 0o100644 << 16
            if name != "labels.zst":
                zf.writestr(info, data)
                continue
            info.file_size = size
            with zf.open(info, "w") as f:
                for _ in range(size >> 20):
                    f.write(bytes(1 << 20))
    code, out, peak = _inspect_check_peak(path)
    assert code == 1 and f"labels.zst: {size} bytes, the manifest says" in out, out
    assert peak < 200 + 100, peak  # MiB: the file once plus the interpreter (a copy per member would double it)
