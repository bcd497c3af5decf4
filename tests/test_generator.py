"""The regeneration engine: the spec's rule, determinism, identity pins, TI equivalence."""

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CPU

import d3mfmt
from d3mfmt import D3MError, D3MModelError, RenderOptions
from d3mfmt.generator import Regenerator, fingerprint, split_patches


@pytest.fixture(scope="module")
def archive(tiny_archive_path):
    return d3mfmt.load_file(tiny_archive_path)


@pytest.fixture(scope="module")
def regen(archive):
    return Regenerator(archive.manifest.generator, archive.embeddings, CPU)


def test_render_shape_range_and_8bit_levels(regen, archive):
    x = regen.render(1, archive.seeds[1].tolist())
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert 0 <= x.min() and x.max() <= 1
    torch.testing.assert_close(torch.round(x * 255) / 255, x, rtol=0, atol=0)
    assert x.std() > 0.01  # not a constant image


def test_same_pixels_for_any_batch_size_position_and_batch_mates(regen, archive):
    seeds = archive.seeds[2].tolist()
    together = regen.render(2, seeds)
    one_by_one = torch.cat([regen.render(2, [s]) for s in seeds])
    reversed_ = regen.render(2, seeds[::-1]).flip(0)
    assert torch.equal(together, one_by_one)
    assert torch.equal(together, reversed_)
    assert torch.equal(regen.render(2, seeds[1:3]), together[1:3])


def test_same_pixels_in_a_fresh_process(regen, archive, tiny_archive_path):
    here = hashlib.sha256(regen.render(0, archive.seeds[0, :2].tolist()).numpy().tobytes()).hexdigest()
    code = (
        "import sys, hashlib, d3mfmt; from d3mfmt.generator import Regenerator; "
        f"a = d3mfmt.load_file({str(tiny_archive_path)!r}); "
        "r = Regenerator(a.manifest.generator, a.embeddings, d3mfmt.RenderOptions(device='cpu')); "
        "print(hashlib.sha256(r.render(0, a.seeds[0, :2].tolist()).numpy().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_fingerprints_of_the_archive_match_a_fresh_render(regen, archive):
    x = regen.render(1, archive.seeds[1].tolist())
    np.testing.assert_array_equal(fingerprint(x, 4), archive.fingerprints[1])


def test_different_seeds_and_classes_give_different_images(regen, archive):
    a = regen.render(0, [1, 2])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(regen.render(0, [1]), regen.render(1, [1]))


def test_split_patches_is_row_major():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = split_patches(img, 2)
    assert p.shape == (2, 4, 3, 2, 2)
    assert torch.equal(p[1, 1], img[1, :, 0:2, 2:4])  # row 0, column 1
    assert torch.equal(p[1, 2], img[1, :, 2:4, 0:2])  # row 1, column 0


@pytest.mark.parametrize("n_vectors", [1, 2])
def test_prompt_embeds_equal_diffusers_textual_inversion(tiny_model, tmp_path, n_vectors):
    """export_embeddings -> load_textual_inversion (all tokens, one call) -> same prompt embedding."""
    import safetensors.torch
    from diffusers import StableDiffusionPipeline
    from tiny_pipeline import archive_for

    from d3mfmt.export import TOKEN_FORMAT, export_embeddings

    archive = archive_for(tiny_model, n_vectors=n_vectors, seed=n_vectors)
    files = export_embeddings(archive, tmp_path / "emb")
    tensors, tokens = [], []
    for path in files:
        (token, tensor), = safetensors.torch.load_file(path).items()
        assert tensor.shape == (n_vectors, 32)
        tokens.append(token)
        tensors.append(tensor)
    assert tokens == [TOKEN_FORMAT.format(c.id) for c in archive.manifest.dataset.classes]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(tensors, token=tokens)
    regen = Regenerator(archive.manifest.generator, archive.embeddings, CPU)
    for c, token in enumerate(tokens):
        prompt = archive.manifest.generator.prompt_template.replace("{token}", token)
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        torch.testing.assert_close(regen.prompt_embeds(c), theirs, rtol=0, atol=1e-6)


def test_pinned_identity_mismatch_is_an_error_unless_overridden(archive):
    gen = replace(archive.manifest.generator, model=replace(archive.manifest.generator.model, identity="files-sha256:" + "0" * 64))
    with pytest.raises(D3MModelError, match="allow_model_mismatch=True"):
        Regenerator(gen, archive.embeddings, CPU)
    Regenerator(gen, archive.embeddings, RenderOptions(device="cpu", allow_model_mismatch=True))


def test_ancestral_scheduler_and_wrong_width_are_refused(archive):
    gen = replace(archive.manifest.generator, scheduler="EulerAncestralDiscreteScheduler")
    with pytest.raises(D3MError, match="must be a deterministic scheduler"):
        Regenerator(gen, archive.embeddings, CPU)
    with pytest.raises(D3MModelError, match="embeddings are 16 wide"):
        Regenerator(archive.manifest.generator, archive.embeddings[:, :, :16], CPU)


def test_missing_model_folder_is_a_clear_error(archive, tmp_path):
    gen = replace(archive.manifest.generator, model=d3mfmt.ModelRef(str(tmp_path / "gone")))
    with pytest.raises(D3MModelError, match="not an existing directory"):
        Regenerator(gen, archive.embeddings, CPU)


def test_render_options_are_the_one_way_to_choose(archive):
    gen = archive.manifest.generator
    with pytest.raises(TypeError, match="device"):
        Regenerator(gen, archive.embeddings, device="cpu")
    with pytest.raises(D3MError, match="render must be a d3mfmt.RenderOptions, got dict"):
        Regenerator(gen, archive.embeddings, {"device": "cpu"})
    with pytest.raises(D3MError, match="RenderOptions.dtype must be one of"):
        Regenerator(gen, archive.embeddings, RenderOptions(device="cpu", dtype="fp16"))
    with pytest.raises(D3MError, match="RenderOptions.allow_download must be True or False"):
        Regenerator(gen, archive.embeddings, RenderOptions(device="cpu", allow_download=1))


def test_one_pipeline_is_shared_per_model_device_dtype(archive, regen):
    other = Regenerator(archive.manifest.generator, archive.embeddings, CPU)
    assert other.pipe.unet is regen.pipe.unet
    assert other.pipe.scheduler is not regen.pipe.scheduler


def test_no_guidance_renders_without_negative_prompt(archive):
    gen = replace(archive.manifest.generator, guidance_scale=1.0)
    r = Regenerator(gen, archive.embeddings, CPU)
    x = r.render(0, [5])
    assert r._negative is None and x.shape == (1, 3, 32, 32)


def test_cuda_in_forked_worker_names_the_fixes(monkeypatch):
    from d3mfmt.generator import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(D3MError, match=r"materialize\(\).*num_workers=0.*spawn"):
        check_device("cuda")
    check_device("cpu")  # the CPU is always fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_or_bogus_devices_are_one_clear_error(archive):
    from d3mfmt.generator import check_device, resolve_render_settings

    for device, match in [("cuda", "cuda is not available on this machine"), ("cuda:3", "not available"),
                          ("bogus", "'bogus' is not a rendering device"), ("meta", "not a rendering device"),
                          ("", "not a rendering device")]:
        with pytest.raises(D3MError, match=match):
            check_device(device)
    with pytest.raises(D3MError, match="not available"):  # before the model is looked up
        resolve_render_settings(archive.manifest.generator, RenderOptions(model="/no/such/model", device="cuda"))


def test_golden_vectors_name_a_model_this_package_resolves():
    from d3mfmt.models import resolve_model

    root = Path(__file__).resolve().parent.parent / "spec" / "vectors"
    for path in root.glob("*.d3m"):
        gen = d3mfmt.load_file(path).manifest.generator
        assert resolve_model(gen.model.id).is_dir()


def test_stochastic_configs_other_pipelines_and_wrong_latents_are_refused(archive):
    gen = archive.manifest.generator
    sde = replace(gen, scheduler="DPMSolverMultistepScheduler",
                  scheduler_config={"num_train_timesteps": 1000, "algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(D3MError, match="algorithm_type.*sde-dpmsolver"):
        Regenerator(sde, archive.embeddings, CPU)
    with pytest.raises(D3MError, match="StableDiffusionXLPipeline"):
        Regenerator(replace(gen, pipeline="StableDiffusionXLPipeline"), archive.embeddings, CPU)
    with pytest.raises(D3MModelError, match=r"latent_shape \[4, 8, 8\] does not fit 32x32"):
        Regenerator(replace(gen, latent_shape=(4, 8, 8)), archive.embeddings, CPU)


def test_mixed_class_batches_give_the_same_pixels_as_single_class_renders(regen, archive):
    """Cross-class batches: every (class, seed) renders bit-identically whatever its batch-mates."""
    per_class = {c: regen.render(c, archive.seeds[c].tolist()) for c in range(3)}
    pairs = [(c, int(archive.seeds[c, i])) for i in range(4) for c in range(3)]  # classes interleaved
    mixed = regen.render_pairs(pairs)
    assert mixed.shape == (12, 3, 32, 32)
    for k, (c, _) in enumerate(pairs):
        assert torch.equal(mixed[k], per_class[c][k // 3]), (k, c)
    # other batch sizes, positions and batch-mates, same pixels
    assert torch.equal(regen.render_pairs(pairs[::-1]).flip(0), mixed)
    assert torch.equal(regen.render_pairs(pairs[5:7]), mixed[5:7])
    assert torch.equal(regen.render_pairs([pairs[4], (0, 123), pairs[9]])[[0, 2]], mixed[[4, 9]])
    assert regen.render_pairs([]).shape == (0, 3, 32, 32)


def test_decode_is_the_pipelines_own_pt_output(regen, archive):
    """The renderer decodes itself (to guard fp16) but gives exactly what output_type='pt' gives."""
    from d3mfmt.generator import CPU_CALL_ROWS, initial_latents, quantize_8bit, single_thread

    info, c = archive.manifest.generator, 1
    seeds = archive.seeds[c, :CPU_CALL_ROWS].tolist()  # the one batch shape the CPU renders with
    with single_thread():
        theirs = regen.pipe(
            prompt_embeds=regen.prompt_embeds(c).expand(len(seeds), -1, -1),
            negative_prompt_embeds=regen.negative_embeds().expand(len(seeds), -1, -1),
            latents=initial_latents(seeds, info.latent_shape), num_inference_steps=info.steps,
            guidance_scale=info.guidance_scale, eta=0.0, height=info.height, width=info.width, output_type="pt",
        ).images
    assert torch.equal(regen.render(c, seeds), quantize_8bit(theirs))


def test_fp16_vae_overflow_is_redone_in_fp32_never_returned(regen):
    """Latents that overflow fp16 on the way into the decoder: the guard redoes the decode in fp32."""
    import copy
    from types import SimpleNamespace

    from d3mfmt.accel import decode_latents

    latents = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * 3e3  # / scaling_factor > 65504
    vae16 = copy.deepcopy(regen.pipe.vae).to(torch.float16)
    with torch.no_grad():
        raw = vae16.decode(latents.half() / vae16.config.scaling_factor).sample
    assert not torch.isfinite(raw).all()  # the overflow this guard exists for
    pipe16 = SimpleNamespace(vae=vae16, image_processor=regen.pipe.image_processor)
    with pytest.warns(UserWarning, match="overflowed in torch.float16"), torch.no_grad():
        images, redone = decode_latents(pipe16, latents.half())
    assert redone == 2 and torch.isfinite(images).all() and vae16.dtype == torch.float16
    with torch.no_grad():
        want, _ = decode_latents(SimpleNamespace(vae=vae16.float(), image_processor=regen.pipe.image_processor),
                                 latents.half().float())
    assert torch.equal(images, want)


def test_fp16_pipeline_keeps_a_force_upcast_vae_in_fp32(archive):
    gen = archive.manifest.generator
    r16 = Regenerator(gen, archive.embeddings, RenderOptions(device="cpu", dtype="float16"))
    assert r16.pipe.unet.dtype == torch.float16 and r16.pipe.vae.dtype == torch.float32
    assert r16.pipe.vae.config.force_upcast


def test_compile_is_its_own_pipeline_and_cache_key_sharing_weights(archive, regen):
    """compile=True wraps the shared UNet in torch.compile (lazily) and never shares eager pixels."""
    compiled = Regenerator(archive.manifest.generator, archive.embeddings, RenderOptions(device="cpu", compile=True))
    assert isinstance(compiled.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.pipe.unet._orig_mod is regen.pipe.unet
    assert compiled.pipe.vae is regen.pipe.vae and compiled.pipe.text_encoder is regen.pipe.text_encoder
    assert compiled.settings.key_parts() == {**regen.settings.key_parts(), "compile": True}
    assert "compile" not in regen.settings.key_parts()  # eager cache keys are what they were


def test_non_finite_fp32_decode_is_an_error_not_an_image(regen):
    from d3mfmt.accel import decode_latents

    latents = torch.zeros((1, 4, 16, 16))
    latents[0, 0, 0, 0] = float("inf")
    with pytest.raises(D3MError, match="non-finite pixels in float32"), torch.no_grad():
        decode_latents(regen.pipe, latents)


def test_verify_renders_mixed_class_batches_with_the_same_drift(archive, regen, monkeypatch):
    from d3mfmt.verify import verify

    calls = []
    real = Regenerator.render_pairs
    monkeypatch.setattr(Regenerator, "render_pairs", lambda self, pairs: calls.append(len(pairs)) or real(self, pairs))
    batched = verify(archive, CPU, n=12, render_batch=8)
    single = verify(archive, CPU, n=12, render_batch=1)
    assert calls == [8, 4] + [1] * 12
    assert batched.images == single.images and np.array_equal(batched.drift, single.drift)
    assert batched.ok and int(batched.drift.max()) == 0


def test_cuda_fast_path_settings_apply_to_a_pipeline(tiny_model):
    """SDPA processors, channels-last and the fp32 VAE, applied as on CUDA (no CUDA op runs)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from d3mfmt.accel import prepare_pipeline, uses_fast_path

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, torch_dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.unet.set_attn_processor(AttnProcessor())  # as if saved with the old processor
    assert uses_fast_path("cuda:0") and not uses_fast_path("cpu")
    prepare_pipeline(pipe, "cuda", "float16")
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16
    cpu = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    prepare_pipeline(cpu, "cpu", "float32")  # the CPU fp32 path is left exactly as loaded
    assert cpu.unet.conv_in.weight.is_contiguous() and cpu.vae.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_fp16_renders_within_the_verify_tolerance(archive, compile):
    from d3mfmt.verify import verify

    render = RenderOptions(device="cuda", compile=compile)
    regen = Regenerator(archive.manifest.generator, archive.embeddings, render)
    assert regen.dtype == "float16"
    report = verify(archive, render, n=12)
    assert report.ok, report.lines([c.name for c in archive.manifest.dataset.classes])
    x = regen.render_pairs([(0, 1), (2, 2), (1, 3)])
    assert torch.isfinite(x).all() and x.std() > 0.01


@pytest.mark.slow
def test_compiled_unet_renders_on_the_cpu_within_tolerance(archive, regen):
    """compile=True end to end (inductor on the CPU: about 2 minutes of compiling here)."""
    compiled = Regenerator(archive.manifest.generator, archive.embeddings, RenderOptions(device="cpu", compile=True))
    pairs = [(0, 1), (1, 2), (2, 3), (0, 4)]
    x, y = compiled.render_pairs(pairs), regen.render_pairs(pairs)
    assert int((x - y).abs().max() * 255) <= 1  # measured here: 0
