"""Render-time rules (SPEC "Scheduler config", "Image geometry", "Render cost"): --check valid means renders.

Every case of issue 20 is reproduced with real diffusers on the built-in model:
the config crashes (or silently changes pixels) when rendered without d3mfmt's
checks, and ``d3mfmt.summary.check`` refuses the archive; its allowed neighbour
renders and verifies. Hypothesis then fuzzes the scheduler table: whatever the
check accepts renders to finite latents.
"""

import json
from dataclasses import replace

import pytest
import torch
from conftest import members_of
from hostile_archives import BUILTIN, SD_BETAS, VECTORS, base_archive, cases, scheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import d3mfmt
from d3mfmt import D3MDataset, RenderLimits, RenderOptions
from d3mfmt.generator import _with_scheduler, initial_latents, shared_pipeline
from d3mfmt.manifest import generator_from_dict
from d3mfmt.modelpin import model_identity
from d3mfmt.models import resolve_model
from d3mfmt.prompts import encode_class_prompt
from d3mfmt.renderable import render_cost
from d3mfmt.schedulers import SCHEDULER_KEYS, check_scheduler_config, unet_evaluations
from d3mfmt.summary import check
from d3mfmt.verify import verify

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' deprecation notes on hostile configs


@pytest.fixture(scope="module")
def corpus():
    return {name: (expect, data) for name, expect, data in cases(big_header_bytes=1 << 20, heavy=False)}


@pytest.fixture(scope="module")
def builtin_pipe():
    path = resolve_model(BUILTIN)
    return shared_pipeline(path, model_identity(path), "cpu", "float32")


def generator_of(data: bytes):
    """The generator section of archive bytes, parsed without the reader's rules."""
    doc = json.loads(members_of(data)[1][1])["generator"]
    cfg = doc["scheduler"]["config"]
    return doc["scheduler"]["class"], cfg, doc


@torch.no_grad()
def render_unchecked(pipe, cls, config, steps, height=32, width=32, guidance=2.0, seed=1):
    """One image's latents through diffusers with none of d3mfmt's checks: what a naive consumer would run."""
    embeds = encode_class_prompt(pipe, "a photo of {token}", "{token}", base_archive().embeddings[0])
    sched_pipe = _with_scheduler(pipe, cls, config)
    factor = pipe.vae_scale_factor
    latents = initial_latents([seed], (4, max(height // factor, 1), max(width // factor, 1)))
    out = sched_pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), latents=latents,
                     num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                     output_type="latent").images
    return out


def scheduler_loop(cls, config, steps, seed=0):
    """The real scheduler's full loop with unit noise as the model output (for step counts a UNet makes slow)."""
    import diffusers

    sched = getattr(diffusers, cls).from_config(config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 2, 2, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        sched.scale_model_input(x, t)
        x = sched.step(torch.randn(1, 4, 2, 2, generator=g), t, x).prev_sample
    return x


def refused(data: bytes, match: str) -> None:
    problems = check(data)
    assert problems and match in problems[0], problems
    with pytest.raises(d3mfmt.D3MFormatError):
        d3mfmt.load(data)


# -- each crash of the review, reproduced, and refused -----------------------

CRASHES = {  # case -> (error diffusers raises, message of the check)
    "sched_dpmsolver_zero_final": (ValueError, "algorithm_type must be 'dpmsolver++'"),
    "sched_dpm_deis_zero_final": (ValueError, "algorithm_type must be 'dpmsolver++'"),
    "sched_variance_learned": (RuntimeError, "variance_type must be null"),
    "sched_lambda_min_clipped_1e6": (IndexError, "has key 'lambda_min_clipped'"),
    "sched_pndm_2_steps": (ValueError, "too few for PNDMScheduler"),
    "sched_unipc_shift_terminal": (ValueError, "shift_terminal must be null"),
    "sched_beta_sigmas_need_scipy": (ImportError, "use_beta_sigmas must be false"),
    "size_36px": (ValueError, "must be multiples of 8"),
    "size_4px": (ValueError, "must be multiples of 8"),
    "size_4096x4px": (ValueError, "must be multiples of 8"),
}


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_what_crashes_in_diffusers_is_refused_by_the_check(name, corpus, builtin_pipe):
    error, message = CRASHES[name]
    _, data = corpus[name]
    cls, config, gen = generator_of(data)
    if name == "sched_beta_sigmas_need_scipy":
        try:
            import scipy  # noqa: F401

            pytest.skip("scipy is installed here, so beta sigmas render; the check refuses them for consumers without it")
        except ImportError:
            pass
    with pytest.raises(error):
        render_unchecked(builtin_pipe, cls, config, min(gen["steps"], 4), gen["height"], gen["width"])
    refused(data, message)


def test_nonfinite_renders_are_refused(corpus, builtin_pipe):
    # Euler with Karras sigmas and beta_start 0: sigma_min is 0, the latents go non-finite; UniPC bh1 onto sigma 0 too
    for name, message in (("sched_euler_karras_beta0", "beta_start must be a number in [1e-05"),
                          ("sched_unipc_bh1_zero_final", "solver_type must be 'bh2'")):
        _, data = corpus[name]
        cls, config, gen = generator_of(data)
        try:
            latents = render_unchecked(builtin_pipe, cls, config, 8)
            assert not torch.isfinite(latents).all(), name
        except (ValueError, RuntimeError, IndexError, ZeroDivisionError):
            pass
        refused(data, message)


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_leading_spacing_at_1000_steps_crashes_and_is_refused_999_renders(cls, corpus):
    # 1,000 UNet calls are slow on a CPU; the crash is in the scheduler's own step, so its loop shows it
    config = {**SD_BETAS, "timestep_spacing": "leading"}
    with pytest.raises((IndexError, AssertionError)):
        scheduler_loop(cls, config, 1000)
    assert torch.isfinite(scheduler_loop(cls, config, 999)).all()
    name = "sched_dpm_leading_1000" if cls.startswith("DPM") else "sched_unipc_leading_1000"
    refused(corpus[name][1], "must be below 1000")
    check_scheduler_config(cls, config, 999)  # accepted (the render cost bound is separate)


def test_lms_needs_scipy_and_is_refused(corpus):
    import diffusers

    try:
        import scipy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="scipy"):
            diffusers.LMSDiscreteScheduler.from_config(SD_BETAS)
    refused(corpus["sched_lms_needs_scipy"][1], "must be a deterministic scheduler")


def test_use_default_values_silently_drops_the_stated_betas(corpus, builtin_pipe):
    import diffusers

    stated = {**SD_BETAS, "beta_start": 0.002, "beta_end": 0.02}
    hidden = {**stated, "_use_default_values": ["beta_start", "beta_end"]}
    sched = diffusers.DDIMScheduler.from_config(hidden)
    assert (sched.config.beta_start, sched.config.beta_end) == (0.0001, 0.02)  # not what the archive says
    a = render_unchecked(builtin_pipe, "DDIMScheduler", stated, 6)
    b = render_unchecked(builtin_pipe, "DDIMScheduler", hidden, 6)
    assert (a - b).abs().max() > 0.05  # other pixels than the writer rendered
    refused(corpus["sched_use_default_values"][1], "private key '_use_default_values'")
    refused(scheduler(corpus["ok_vector_topk"][1], "DDIMScheduler", {**SD_BETAS, "_class_name": "DDIMScheduler"}),
            "private key '_class_name'")


def test_the_builder_and_the_golden_vectors_write_no_private_keys(tiny_build):
    from pathlib import Path

    vectors = sorted((Path(__file__).parent.parent / "spec" / "vectors").glob("*.d3m"))
    for path in [*vectors, tiny_build.out]:  # the golden vectors and a real d3m-build archive
        gen = d3mfmt.load_file(path).manifest.generator
        assert not [k for k in gen.scheduler_config if k.startswith("_")], path
        assert set(gen.scheduler_config) <= set(SCHEDULER_KEYS[gen.scheduler]), path


# -- the allowed neighbours render and verify ----------------------------------


@pytest.mark.parametrize("name", ["ok_dpmsolverpp_karras", "ok_pndm_4_steps", "ok_unipc_leading",
                                  "ok_euler_karras_smallest_beta", "ok_40px", "ok_8px"])
def test_what_the_check_accepts_renders_and_verifies(name, corpus, tmp_path):
    expect, data = corpus[name]
    assert expect == "valid" and check(data) == []
    path = tmp_path / f"{name}.d3m"
    path.write_bytes(data)
    ds = D3MDataset(path, cache_dir=tmp_path / "cache", render=RenderOptions(device="cpu"))
    x, label, c = ds[0]
    assert torch.isfinite(x).all() and x.shape[0] == 3 and c == 0
    archive = d3mfmt.load(data)
    report = verify(archive, RenderOptions(device="cpu"), n=2)
    assert report.ok, report.lines(["0", "1"])


# -- sizes and render cost -------------------------------------------------------


def test_sizes_must_fit_one_vae_factor_and_the_builtin_geometry(corpus):
    refused(corpus["size_two_vae_factors"][1], "must be one VAE factor")
    refused(corpus["size_builtin_factor_8"][1], "renders 4-channel latents at VAE factor 4")
    refused(corpus["size_builtin_5_channels"][1], "the archive asks 5 channels")


def test_render_cost_is_bounded_with_a_documented_override(corpus):
    for name, what in (("cost_1024px_1_step", "latent pixels per image"), ("cost_4096px", "latent pixels per image"),
                       ("cost_heun_1000_steps", "UNet evaluations per image"),
                       ("cost_builtin_by_folder_path_1024px", "latent pixels per image")):
        data = corpus[name][1]
        refused(data, what)
        assert "render_limits=RenderLimits(" in check(data)[0]
    trusted = RenderLimits(evaluations=None, latent_pixels=None, per_image=None, total=None)
    assert check(corpus["cost_heun_1000_steps"][1], render_limits=trusted) == []
    assert d3mfmt.load(corpus["cost_1024px_1_step"][1], render_limits=trusted).manifest.generator.height == 1024


def _sd_generator(side, steps, scheduler="DDIMScheduler", guidance=7.5):
    base = base_archive().manifest.generator
    return replace(base, model=d3mfmt.ModelRef("runwayml/stable-diffusion-v1-5"), height=side, width=side,
                   latent_shape=(4, side // 8, side // 8), steps=steps, guidance_scale=guidance, scheduler=scheduler,
                   scheduler_config=SD_BETAS)


def test_default_limits_admit_stable_diffusion_asks_and_refuse_runaway_ones():
    from d3mfmt.renderable import DEFAULT_RENDER_LIMITS as L

    def fits(gen, images=1):
        cost = render_cost(gen, images)
        return (cost.evaluations <= L.evaluations and cost.latent_pixels <= L.latent_pixels
                and cost.per_image <= L.per_image and cost.total <= L.total)

    for side in (512, 768):
        for steps in (50, 100):
            for sched in ("DDIMScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler", "PNDMScheduler"):
                assert fits(_sd_generator(side, steps, sched)), (side, steps, sched)
    assert fits(_sd_generator(512, 100), images=1000 * 50)  # ImageNet-1k at IPC 50
    assert not fits(_sd_generator(1024, 1000, guidance=1.0))
    assert not fits(_sd_generator(2048, 1, guidance=1.0))


def test_builtin_defaults_admit_the_builtin_archives():
    from d3mfmt.renderable import limits_for

    for vector in ("topk", "onehot", "multivector"):
        data = (VECTORS / f"{vector}.d3m").read_bytes()
        assert check(data) == []
    limits = limits_for(base_archive().manifest.generator)
    assert (limits.latent_pixels, limits.per_image) == (256, 65536)  # the built-in's own size, 8x8 latents


@pytest.mark.parametrize("cls", list(SCHEDULER_KEYS))
def test_the_cost_counts_every_unet_call_diffusers_makes(cls):
    import diffusers

    for steps in (4, 25, 100):
        for extra in ({}, {"skip_prk_steps": True} if cls == "PNDMScheduler" else {}):
            sched = getattr(diffusers, cls).from_config({**SD_BETAS, **extra})
            sched.set_timesteps(steps)
            assert unet_evaluations(cls, {**SD_BETAS, **extra}, steps) == len(sched.timesteps), (cls, steps, extra)


# -- the table, fuzzed: whatever the check accepts renders ------------------------

VALUES = {
    "beta_start": st.sampled_from([0.0, 1e-6, 1e-5, 0.0001, 0.00085, 0.02, 0.05]),
    "beta_end": st.sampled_from([1e-5, 0.012, 0.02, 0.1]),
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    "prediction_type": st.sampled_from(["epsilon", "v_prediction", "sample"]),
    "timestep_spacing": st.sampled_from(["leading", "trailing", "linspace"]),
    "steps_offset": st.sampled_from([0, 1, 10, 900]),
    "solver_order": st.integers(1, 3),
    "algorithm_type": st.sampled_from(["dpmsolver++", "dpmsolver", "deis"]),
    "solver_type": st.sampled_from(["midpoint", "heun", "logrho", "bh1", "bh2"]),
    "final_sigmas_type": st.sampled_from(["zero", "sigma_min"]),
    "interpolation_type": st.sampled_from(["linear", "log_linear"]),
    "timestep_type": st.sampled_from(["discrete", "continuous"]),
    "clip_sample_range": st.sampled_from([1e-6, 1.0, 1e6]),
    "sample_max_value": st.sampled_from([1e-6, 1.0, 1e6]),
    "dynamic_thresholding_ratio": st.sampled_from([1e-6, 0.995, 1.0]),
    "flow_shift": st.sampled_from([1e-6, 1.0, 1e6]),
    "time_shift_type": st.sampled_from(["exponential", "linear"]),
    "disable_corrector": st.sampled_from([[], [0, 1], [999]]),
    "predict_x0": st.booleans(),
}


@st.composite
def scheduler_configs(draw):
    cls = draw(st.sampled_from(sorted(SCHEDULER_KEYS)))
    keys = sorted(SCHEDULER_KEYS[cls])
    config = {}
    for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=8)):
        kind = SCHEDULER_KEYS[cls][key][0]
        config[key] = draw(VALUES.get(key, st.booleans() if kind in ("bool", "choice") else st.none()))
    return cls, config


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=scheduler_configs(), steps=st.sampled_from([1, 2, 3, 4, 6, 8]), guidance=st.sampled_from([1.0, 3.0]))
def test_fuzz_accepted_configs_render_finite_pixels_with_the_real_unet(drawn, steps, guidance, builtin_pipe):
    cls, config = drawn
    try:
        check_scheduler_config(cls, config, steps)
    except d3mfmt.D3MFormatError:
        return
    latents = render_unchecked(builtin_pipe, cls, config, steps, guidance=guidance)
    assert torch.isfinite(latents).all(), (cls, config, steps)


@settings(max_examples=100, deadline=None)
@given(drawn=scheduler_configs(), steps=st.sampled_from([1, 5, 50, 100, 249, 250, 251, 500, 999, 1000]))
def test_fuzz_accepted_configs_run_the_scheduler_loop_at_any_step_count(drawn, steps):
    cls, config = drawn
    try:
        check_scheduler_config(cls, config, steps)
    except d3mfmt.D3MFormatError:
        return
    assert torch.isfinite(scheduler_loop(cls, config, steps)).all(), (cls, config, steps)


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 80), width=st.integers(1, 80), factor=st.sampled_from([1, 2, 3, 4, 8]),
       channels=st.integers(0, 6))
def test_fuzz_geometry_is_accepted_exactly_when_it_fits(height, width, factor, channels):
    base = base_archive()
    gen = replace(base.manifest.generator, height=height, width=width,
                  latent_shape=(max(channels, 1), max(height // factor, 1), max(width // factor, 1)))
    doc = json.loads(members_of(d3mfmt.save(base))[1][1])
    doc["generator"].update(height=height, width=width, latent_shape=list(gen.latent_shape))
    fits = (height % 8 == 0 and width % 8 == 0 and factor == 4 and gen.latent_shape[0] == 4
            and height == 4 * gen.latent_shape[1] and width == 4 * gen.latent_shape[2])
    try:
        generator_from_dict(doc["generator"])
        from d3mfmt.renderable import check_geometry

        check_geometry(generator_from_dict(doc["generator"]), 64)
        accepted = True
    except d3mfmt.D3MFormatError:
        accepted = False
    assert accepted == fits, (height, width, gen.latent_shape)
