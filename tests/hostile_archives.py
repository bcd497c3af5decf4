"""Hostile .d3m archives for the built-in model, one per rule of issue 20, and a few valid neighbours.

Each case is ``(name, expect, bytes)``: ``expect`` is ``"refused"`` (the reader's
check must refuse it) or ``"valid"`` (the check accepts it, and it must render
and verify). The tests use them; ``python tests/hostile_archives.py OUT`` writes
them all to OUT for ``examples/hostile_corpus.py OUT``. Hostile bytes are made
by editing a valid archive's members directly (``conftest``'s helpers), since
d3mfmt's own writer refuses to write them.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import members_of, with_manifest, with_member, zip_members  # noqa: E402

import d3mfmt  # noqa: E402
from d3mfmt.models import WEIGHTS_DIR  # noqa: E402

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
BUILTIN = "d3m/tiny-mnist"
SD_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
HUGE_INT = "9" * 4300  # the integer the review used: Python's int() refuses one digit more


def base_archive() -> d3mfmt.Archive:
    """The golden ``onehot`` vector: built-in model, two classes, one 32-px image each, 20 DDIM steps."""
    return d3mfmt.load_file(VECTORS / "onehot.d3m")


def with_generator(archive: d3mfmt.Archive, render_fingerprints: bool = False, **changes) -> d3mfmt.Archive:
    """``archive`` with generator fields replaced; with real 4x4 fingerprints of the new images when asked."""
    gen = replace(archive.manifest.generator, **changes)
    out = replace(archive, manifest=replace(archive.manifest, generator=gen))
    if not render_fingerprints:
        return out
    import numpy as np

    from d3mfmt import RenderOptions
    from d3mfmt.generator import Regenerator, fingerprint

    regen = Regenerator(gen, archive.embeddings, RenderOptions(device="cpu"))
    prints = np.stack([fingerprint(regen.render(c, out.seeds[c].tolist()), 4) for c in range(len(out.seeds))])
    return replace(out, manifest=replace(out.manifest, fingerprint_size=4), fingerprints=prints)


def edit(data: bytes, *path_and_value) -> bytes:
    """``data`` with the manifest value at ``path`` set (``None`` as the last path part's value deletes nothing)."""
    *path, value = path_and_value

    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return with_manifest(data, mutate)


def raw_manifest(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with bytes of manifest.json replaced (for numbers ``json`` would not write)."""
    entries = members_of(data)
    assert old in entries[1][1], old
    entries[1] = ("manifest.json", entries[1][1].replace(old, new, 1))
    return zip_members(entries)


def scheduler(data: bytes, cls: str, config: dict, steps: int | None = None) -> bytes:
    out = edit(edit(data, "generator", "scheduler", "class", cls), "generator", "scheduler", "config", config)
    return out if steps is None else edit(out, "generator", "steps", steps)


def size(data: bytes, height: int, width: int, latent: tuple[int, int, int]) -> bytes:
    for key, value in (("height", height), ("width", width), ("latent_shape", list(latent))):
        data = edit(data, "generator", key, value)
    return data


def zip_with(data: bytes, index: int, **fields) -> bytes:
    """``data`` rewritten by zipfile with header fields of member ``index`` changed (external_attr, create_system, ...)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, (name, body) in enumerate(members_of(data)):
            info = zipfile.ZipInfo(name, date_time=fields.get("date_time", (1980, 1, 1, 0, 0, 0)) if i == index
                                   else (1980, 1, 1, 0, 0, 0))
            info.create_system, info.external_attr = 3, 0o100644 << 16
            if i == index:
                for key, value in fields.items():
                    if key != "date_time":
                        setattr(info, key, value)
            zf.writestr(info, body)
    return buf.getvalue()


def tensors_member(header: dict, body: bytes) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(blob)) + blob + body


def big_header_member(data: bytes, header_bytes: int) -> bytes:
    """The tensors member with ``header_bytes`` of ``__metadata__`` lists padding its header (valid JSON)."""
    raw = members_of(data)[2][1]
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    filler = ",".join(["[]"] * max(1, header_bytes // 3))
    blob = json.dumps(header, separators=(",", ":")).encode()[:-1] + b',"__metadata__":{"x":[' + filler.encode() + b"]}}"
    return struct.pack("<Q", len(blob)) + blob + raw[8 + n :]


def number_cases(a: d3mfmt.Archive, good: bytes) -> list[tuple[str, str, bytes]]:
    """Numbers beyond the double range, anywhere; and valid extremes the summary's arithmetic overflows on."""
    teacher = d3mfmt.save(replace(a, manifest=replace(a.manifest, teacher=d3mfmt.TeacherInfo("t", None, 0.5))))
    overflow = {"inversion": {"0": {"val_loss_init": 1e308, "val_loss_best": -1e308},
                              "1": {"val_loss_init": 1e-300, "val_loss_best": 1e300}}}  # -inf + inf: NaN
    huge = HUGE_INT.encode()
    return [
        ("num_4300_digit_guidance", "refused", raw_manifest(good, b'"guidance_scale":2.0', b'"guidance_scale":' + huge)),
        ("num_4300_digit_in_build", "refused", edit(good, "build", {"provenance": {"x": int(HUGE_INT)}})),
        ("num_400_digit_beta_start", "refused", raw_manifest(good, b'"beta_start":0.00085', b'"beta_start":1' + b"0" * 400)),
        ("num_1e999_eta", "refused", raw_manifest(good, b'"eta":0.0', b'"eta":1e999')),
        ("num_huge_temperature", "refused", raw_manifest(good, b'"temperature":1.0', b'"temperature":' + huge)),
        ("num_huge_teacher_accuracy", "refused", raw_manifest(teacher, b'"accuracy":0.5', b'"accuracy":' + huge)),
        ("num_trained_betas_huge", "refused", edit(good, "generator", "scheduler", "config", "trained_betas", [10**400] * 1000)),
        # --json must stay strict JSON even where the summary's own arithmetic overflows
        ("num_build_inversion_overflow", "valid", d3mfmt.save(
            with_generator(replace(a, manifest=replace(a.manifest, build=overflow)), render_fingerprints=True, steps=4))),
    ]


def container_cases(good: bytes, big_header_bytes: int) -> list[tuple[str, str, bytes]]:
    """ZIP header fields SPEC fixes; the safetensors header; the `members` keys."""
    raw = members_of(good)[2][1]
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    extra = dict(header, extra={"dtype": "U8", "shape": [1], "data_offsets": [len(body), len(body) + 1]})
    return [
        ("zip_symlink_mimetype", "refused", zip_with(good, 0, external_attr=0o120777 << 16)),
        ("zip_mode_0777_manifest", "refused", zip_with(good, 1, external_attr=0o100777 << 16)),
        ("zip_made_by_msdos", "refused", zip_with(good, 2, create_system=0)),
        ("zip_other_date", "refused", zip_with(good, 3, date_time=(2024, 1, 1, 0, 0, 0))),
        ("zip_internal_attr", "refused", zip_with(good, 3, internal_attr=1)),
        ("st_header_100mib_of_empty_lists", "refused",
         with_member(good, "tensors.safetensors", big_header_member(good, big_header_bytes))),
        ("st_metadata_not_strings", "refused",
         with_member(good, "tensors.safetensors", tensors_member({**header, "__metadata__": {"a": []}}, body))),
        ("st_extra_tensor", "refused", with_member(good, "tensors.safetensors", tensors_member(extra, body + b"\0"))),
        ("members_unknown_name", "refused", edit(good, "members", "extra.bin", {"size": 0, "sha256": "0" * 64})),
    ]


def scheduler_cases(good: bytes) -> list[tuple[str, str, bytes]]:
    """The scheduler configs of the review that crash, or silently change pixels, in diffusers."""
    dpm, unipc = "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"
    leading = {**SD_BETAS, "timestep_spacing": "leading"}
    return [
        ("sched_lms_needs_scipy", "refused", scheduler(good, "LMSDiscreteScheduler", SD_BETAS)),
        ("sched_beta_sigmas_need_scipy", "refused",
         scheduler(good, "EulerDiscreteScheduler", {**SD_BETAS, "use_beta_sigmas": True})),
        ("sched_dpmsolver_zero_final", "refused", scheduler(good, dpm, {**SD_BETAS, "algorithm_type": "dpmsolver"})),
        ("sched_dpm_deis_zero_final", "refused", scheduler(good, dpm, {**SD_BETAS, "algorithm_type": "deis"})),
        ("sched_variance_learned", "refused", scheduler(good, dpm, {**SD_BETAS, "variance_type": "learned"})),
        ("sched_lambda_min_clipped_1e6", "refused", scheduler(good, dpm, {**SD_BETAS, "lambda_min_clipped": 1e6})),
        ("sched_dpm_leading_1000", "refused", scheduler(good, dpm, leading, 1000)),
        ("sched_unipc_leading_1000", "refused", scheduler(good, unipc, leading, 1000)),
        ("sched_pndm_2_steps", "refused", scheduler(good, "PNDMScheduler", SD_BETAS, 2)),
        ("sched_unipc_shift_terminal", "refused", scheduler(good, unipc, {**SD_BETAS, "shift_terminal": 0.5})),
        ("sched_euler_karras_beta0", "refused",
         scheduler(good, "EulerDiscreteScheduler", {**SD_BETAS, "use_karras_sigmas": True, "beta_start": 0.0})),
        ("sched_use_default_values", "refused",
         scheduler(good, "DDIMScheduler", {**SD_BETAS, "_use_default_values": ["beta_start", "beta_end"]})),
        ("sched_unipc_bh1_zero_final", "refused", scheduler(good, unipc, {**SD_BETAS, "solver_type": "bh1"})),
    ]


def size_and_cost_cases(good: bytes) -> list[tuple[str, str, bytes]]:
    """Sizes the pipeline or the built-in model cannot render; render costs over the bound."""
    one_step = lambda data: edit(data, "generator", "steps", 1)  # noqa: E731
    big = one_step(size(good, 1024, 1024, (4, 256, 256)))
    return [
        ("size_36px", "refused", size(good, 36, 36, (4, 9, 9))),
        ("size_4px", "refused", size(good, 4, 4, (4, 1, 1))),
        ("size_4096x4px", "refused", size(good, 4096, 4, (4, 1024, 1))),
        ("size_two_vae_factors", "refused", size(good, 32, 64, (4, 8, 8))),
        ("size_builtin_factor_8", "refused", size(good, 32, 32, (4, 4, 4))),
        ("size_builtin_5_channels", "refused", size(good, 32, 32, (5, 8, 8))),
        ("cost_1024px_1_step", "refused", big),
        ("cost_4096px", "refused", one_step(size(good, 4096, 4096, (4, 1024, 1024)))),
        ("cost_heun_1000_steps", "refused", scheduler(good, "HeunDiscreteScheduler", SD_BETAS, 1000)),
        ("cost_builtin_by_folder_path_1024px", "refused", edit(big, "generator", "model", "id", str(WEIGHTS_DIR / "tiny-mnist"))),
    ]


def valid_cases(a: d3mfmt.Archive, heavy: bool) -> list[tuple[str, str, bytes]]:
    """What the rules allow next to each refusal; fingerprints rendered here, so verify is meaningful."""
    dpm_karras = {**SD_BETAS, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    valid = [
        ("ok_dpmsolverpp_karras", dict(scheduler="DPMSolverMultistepScheduler", steps=8, scheduler_config=dpm_karras)),
        ("ok_pndm_4_steps", dict(scheduler="PNDMScheduler", steps=4, scheduler_config=SD_BETAS)),
        ("ok_unipc_leading", dict(scheduler="UniPCMultistepScheduler", steps=12,
                                  scheduler_config={**SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1})),
        ("ok_euler_karras_smallest_beta", dict(scheduler="EulerDiscreteScheduler", steps=8,
                                               scheduler_config={**SD_BETAS, "use_karras_sigmas": True, "beta_start": 1e-5})),
        ("ok_40px", dict(height=40, width=40, latent_shape=(4, 10, 10), steps=8)),
        ("ok_8px", dict(height=8, width=8, latent_shape=(4, 2, 2), steps=8)),
        ("ok_64px_heun_at_the_cost_limit", dict(scheduler="HeunDiscreteScheduler", steps=64, height=64, width=64,
                                                latent_shape=(4, 16, 16), scheduler_config=SD_BETAS)),
    ]
    out = [(name, "valid", d3mfmt.save(with_generator(a, render_fingerprints=True, **changes)))
           for name, changes in (valid if heavy else valid[:-1])]
    return out + [(f"ok_vector_{v}", "valid", (VECTORS / f"{v}.d3m").read_bytes()) for v in ("topk", "multivector")]


def cases(big_header_bytes: int = (100 << 20) - 4096, heavy: bool = True) -> list[tuple[str, str, bytes]]:
    """Every hostile case (and valid neighbour) for the built-in model.

    ``big_header_bytes`` sizes the header bomb; ``heavy=False`` leaves out the valid
    archive at the built-in's render-cost limit (its fingerprints take seconds to render).
    """
    a = base_archive()
    good = d3mfmt.save(a)
    return (number_cases(a, good) + container_cases(good, big_header_bytes) + scheduler_cases(good)
            + size_and_cost_cases(good) + valid_cases(a, heavy))


def write_corpus(folder: Path, big_header_bytes: int = (100 << 20) - 4096) -> list[Path]:
    """Write every case as ``NAME.d3m`` (and ``expected.json``: name -> expect) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    expected, paths = {}, []
    for name, expect, data in cases(big_header_bytes):
        path = folder / f"{name}.d3m"
        path.write_bytes(data)
        expected[name] = {"expect": expect, "sha256": hashlib.sha256(data).hexdigest()}
        paths.append(path)
    (folder / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/hostile_archives.py OUT_FOLDER")
    for p in write_corpus(Path(sys.argv[1])):
        print(p)
