"""Real checkpoint layouts (tests/real_configs.py): resolve, pin, load, render and refuse on each."""

import hashlib
import json
import os
import shlex
import shutil
from dataclasses import replace

import numpy as np
import pytest

import d3mfmt
from d3mfmt import D3MModelError, modelpin
from d3mfmt.modelpin import model_files, model_identity
from d3mfmt.models import resolve_model
from d3mfmt.schedulers import SCHEDULER_KEYS

import real_configs as rc

LAYOUTS = ("sd15", "sd21", "sd21base")
EXTRAS = ("model_index.json", "scheduler/scheduler_config.json")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Every fixture layout once: the three SD layouts, the SD 1.5 full snapshot, fp16-only, SDXL."""
    root = tmp_path_factory.mktemp("real")
    made = {name: rc.write_pipeline(name, root / name) for name in (*LAYOUTS, "sdxl")}
    made["sd15-full"] = rc.write_pipeline("sd15", root / "sd15-full", full_snapshot=True)
    made["fp16"] = rc.write_pipeline("sd15", root / "fp16", variant="fp16")
    return made


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(tmp_path / "d3mfmt-cache"))
    modelpin._DIGEST_MEMO.clear()


def generator_for(folder, model_id=None, variant=None, steps=2):
    """The generator section a build on ``folder`` records: its own scheduler, pinned identity, 2 steps."""
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pixels = rc.PIXELS
    files = model_files(folder, variant)
    return d3mfmt.GeneratorInfo(
        model=d3mfmt.ModelRef(model_id or str(folder), None, files.identity(), files.variant),
        scheduler=scheduler["_class_name"],
        # what a writer stores: the keys the format takes for this scheduler (PNDM ignores SD 1.5's clip_sample)
        scheduler_config={k: v for k, v in scheduler.items() if k in SCHEDULER_KEYS[scheduler["_class_name"]]},
        steps=steps, guidance_scale=1.0, height=pixels, width=pixels,
        latent_shape=(4, pixels // 8, pixels // 8), prompt_template="a photo of {token}",
    )


def render(gen, **kwargs):
    from d3mfmt.generator import Regenerator

    embeddings = np.random.default_rng(0).normal(0, 0.02, (1, 1, 32)).astype(np.float16)
    regen = Regenerator(gen, embeddings, d3mfmt.RenderOptions(device="cpu", **kwargs))
    return regen, regen.render(0, [7])


# --- the real tokenizer -------------------------------------------------------------

def test_tokenizer_files_are_byte_identical_to_the_hubs():
    for name, data in rc.clip_tokenizer_files().items():
        assert hashlib.sha256(data).hexdigest() == rc.HUB_TOKENIZER_SHA256[name]


def test_real_tokenizer_splits_imagenet_names(folders):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folders["sd15"] / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert len(tok("tench, Tinca tinca", add_special_tokens=False).input_ids) > 1
    assert len(tok("goldfish", add_special_tokens=False).input_ids) == 1


# --- resolve, pin, load, render -------------------------------------------------------

@pytest.mark.parametrize("name", [*LAYOUTS, "fp16"])
def test_each_layout_resolves_pins_loads_and_renders(folders, name):
    path = resolve_model(str(folders[name]))
    files = model_files(path)
    assert files.variant == ("fp16" if name == "fp16" else None)
    assert all((path / rel).is_file() for rel in files.files)
    gen = generator_for(path)
    regen, image = render(gen)
    assert image.shape == (1, 3, gen.height, gen.width) and np.isfinite(image.numpy()).all()
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert regen.settings.model_identity == gen.model.identity and regen.settings.variant == files.variant
    expected = {"sd15": "PNDMScheduler", "sd21base": "PNDMScheduler", "sd21": "DDIMScheduler", "fp16": "PNDMScheduler"}
    assert type(regen.pipe.scheduler).__name__ == expected[name]
    if name == "sd21":
        assert regen.pipe.scheduler.config.prediction_type == "v_prediction"
        assert regen.pipe.unet.config.use_linear_projection and regen.pipe.text_encoder.config.hidden_act == "gelu"


def test_the_pin_covers_everything_the_pipeline_loads(folders, tmp_path):
    """A copy of only the pinned files (+ model_index, scheduler) loads and renders the full snapshot's pixels."""
    full = folders["sd15-full"]
    files = model_files(full)
    assert not any(rel.startswith(("safety_checker", "feature_extractor")) or ".fp16." in rel or "non_ema" in rel
                   or rel.endswith(".bin") or "/" not in rel for rel in files.files)
    minimal = rc.copy_files(full, tmp_path / "minimal", [*files.files, *EXTRAS])
    gen = generator_for(full)
    _, from_full = render(gen)
    _, from_minimal = render(replace(gen, model=replace(gen.model, id=str(minimal))))
    assert model_identity(minimal) == gen.model.identity
    assert np.array_equal(from_full.numpy(), from_minimal.numpy())


def test_same_checkpoint_same_identity_however_it_arrived(folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    full = folders["sd15-full"]
    identity = model_identity(full)
    copy = rc.copy_files(full, tmp_path / "copy", [*model_files(full).files, *EXTRAS])
    assert model_identity(copy) == identity  # a plain copy of the diffusers files only
    cache = tmp_path / "hub"
    rc.hub_cache(cache, "runwayml/stable-diffusion-v1-5", full)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snapshot = resolve_model("runwayml/stable-diffusion-v1-5")
    assert model_identity(snapshot) == identity  # the full hub snapshot, digests from blob names
    assert model_identity(resolve_model("runwayml/stable-diffusion-v1-5", "a" * 40)) == identity
    rel = "unet/diffusion_pytorch_model.safetensors"
    assert modelpin.hub_blob_digest(snapshot / rel) == os.path.basename(os.path.realpath(snapshot / rel))


def test_hub_digest_comes_from_the_blob_name_without_reading_it(tmp_path):
    """A 1 GB sparse blob: its digest is its name (an arbitrary one, so reading it would give another)."""
    name = "ab" * 32
    blob = tmp_path / "models--o--n" / "blobs" / name
    blob.parent.mkdir(parents=True)
    with open(blob, "wb") as f:
        f.truncate(1 << 30)
    link = tmp_path / "models--o--n" / "snapshots" / ("c" * 40) / "unet" / "w.safetensors"
    link.parent.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, link.parent), link)
    assert modelpin.file_sha256(link) == name
    plain = tmp_path / "elsewhere.safetensors"
    os.symlink(blob, plain)  # the same blob reached from outside a snapshot is hashed
    assert modelpin.hub_blob_digest(plain) is None


def test_local_digests_are_remembered_but_never_trusted_after_an_edit(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\1" * (2 << 20))
    first = modelpin.file_sha256(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    modelpin._DIGEST_MEMO.clear()
    calls = []
    real_hash = modelpin._hash_file
    modelpin._hash_file = lambda p: calls.append(p) or real_hash(p)
    try:
        assert modelpin.file_sha256(path) == first and not calls  # from the sidecar table
        st = path.stat()
        with open(path, "r+b") as f:  # same size, mtime set back: ctime still changes
            f.write(b"\2")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert modelpin.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first
        assert len(calls) == 1
    finally:
        modelpin._hash_file = real_hash


def test_other_weights_give_another_identity_and_are_refused(folders, tmp_path):
    full = folders["sd15-full"]
    gen = generator_for(full)
    swapped = shutil.copytree(full, tmp_path / "swapped", symlinks=True)
    os.replace(swapped / "unet" / "diffusion_pytorch_model.non_ema.safetensors",
               swapped / "unet" / "diffusion_pytorch_model.safetensors")
    assert model_identity(swapped) != gen.model.identity
    assert model_identity(full, "fp16") != gen.model.identity  # another variant of the same checkpoint
    other = replace(gen, model=replace(gen.model, id=str(swapped)))
    with pytest.raises(D3MModelError, match=r"pins model .* but the plain weights of .* have files-sha256:.*fp16"):
        render(other)
    _, image = render(other, allow_model_mismatch=True)
    assert image.shape[0] == 1


def test_an_archive_records_its_variant_and_a_full_snapshot_renders_it(folders):
    full = folders["sd15-full"]
    gen = generator_for(full, variant="fp16")
    assert gen.model.variant == "fp16" and d3mfmt.manifest.generator_from_dict(
        d3mfmt.manifest.generator_to_dict(gen)) == gen
    regen, _ = render(gen)  # the folder also has plain weights: the recorded variant wins
    assert regen.settings.variant == "fp16" and regen.settings.model_identity == model_identity(full, "fp16")
    plain = replace(gen, model=replace(gen.model, variant=None))
    with pytest.raises(D3MModelError, match="also has the variant.*fp16"):
        render(plain)


def test_legacy_whole_folder_pins_are_named_as_such(folders):
    gen = generator_for(folders["sd21base"])
    old = replace(gen, model=replace(gen.model, identity="sha256:" + "0" * 64))
    with pytest.raises(D3MModelError, match="whole-folder rule of d3mfmt 0.1.*allow_model_mismatch"):
        render(old)


# --- variants ------------------------------------------------------------------------

def test_variant_is_detected_when_only_variant_files_exist(folders):
    from d3mfmt.generator import shared_pipeline

    assert model_files(folders["fp16"]).variant == "fp16"
    pipe = shared_pipeline(folders["fp16"], model_identity(folders["fp16"]), "cpu", "float32")  # no variant given
    assert str(pipe.unet.dtype) == "torch.float32" and pipe.text_encoder.config.hidden_size == 32  # fp16 files, fp32 compute
    assert model_files(folders["fp16"], "fp16").files == model_files(folders["fp16"]).files
    assert model_files(folders["sd15-full"]).variant is None  # plain weights exist: they are the default
    assert model_files(folders["sd15-full"]).variants == ("fp16", "non_ema")


def test_missing_or_ambiguous_variants_name_what_is_there(folders, tmp_path):
    with pytest.raises(D3MModelError, match=r"text_encoder/ has no model\.bf16\.safetensors.*unet: fp16"):
        model_files(folders["fp16"], "bf16")
    with pytest.raises(D3MModelError, match="text_encoder/ has no model.non_ema.safetensors"):
        model_files(folders["sd15-full"], "non_ema")  # only the UNet has non-EMA weights
    both = shutil.copytree(folders["fp16"], tmp_path / "both")
    for component, prefix in rc.WEIGHT_FILES.items():
        if (both / component).is_dir():
            shutil.copyfile(both / component / f"{prefix}.fp16.safetensors", both / component / f"{prefix}.ema.safetensors")
    with pytest.raises(D3MModelError, match="variants present: .*ema, fp16.*Pass variant=NAME"):
        model_files(both)
    with pytest.raises(D3MModelError, match="variant must be None or a name"):
        model_files(both, "fp16/../x")


def test_sharded_weights_pin_the_index_and_its_shards(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(folders["sd21base"], tmp_path / "sharded")
    unet = folder / "unet"
    tensors = load_file(unet / "diffusion_pytorch_model.safetensors")
    names = sorted(tensors)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, unet / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}  # what save_pretrained writes
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    files = model_files(folder).files
    assert {f"unet/{s}" for s in halves} | {"unet/diffusion_pytorch_model.safetensors.index.json"} <= set(files)
    assert "unet/diffusion_pytorch_model.safetensors" not in files  # diffusers reads the index first
    gen = generator_for(folder)
    (unet / "diffusion_pytorch_model.safetensors").unlink()  # so loading can only have used the shards
    assert model_identity(folder) == gen.model.identity
    render(gen)
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(D3MModelError, match="no 'metadata' object"):
        model_files(folder)  # diffusers would raise a KeyError deep inside loading
    (unet / next(iter(halves))).unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(D3MModelError, match="lists 1 shard.*missing"):
        model_files(folder)


# --- refusals ---------------------------------------------------------------------------

def test_sdxl_is_refused_before_any_work(folders):
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.from_pretrained(folders["sdxl"], local_files_only=True)  # the fixture is real SDXL
    with pytest.raises(D3MModelError) as info:
        resolve_model(str(folders["sdxl"]))
    message = str(info.value)
    assert "SDXL" in message and "StableDiffusionPipeline" in message and "\n" not in message
    gen = generator_for(folders["sd15"])
    with pytest.raises(D3MModelError, match="SDXL"):
        render(replace(gen, model=replace(gen.model, id=str(folders["sdxl"]))))


def test_other_pipelines_and_components_are_refused(folders, tmp_path):
    folder = shutil.copytree(folders["sd21base"], tmp_path / "inpaint")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    with pytest.raises(D3MModelError, match="'StableDiffusionInpaintPipeline' pipeline.*supports StableDiffusionPipeline"):
        resolve_model(str(folder))
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(D3MModelError, match="names text_encoder .*T5EncoderModel.*CLIPTextModel"):
        resolve_model(str(folder))


def test_single_file_checkpoint_is_refused_with_the_command_that_converts_it(tmp_path):
    folder = tmp_path / "it's; rm -rf ~"
    folder.mkdir()
    path = rc.single_file_checkpoint(folder / "v1-5-pruned-emaonly.safetensors")
    with pytest.raises(D3MModelError) as info:
        resolve_model(str(path))
    message = str(info.value)
    assert "single-file checkpoint" in message and "\n" not in message
    command = message.split("`")[1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    assert f"from_single_file({str(path)!r})" in argv[2] and "save_pretrained(" in argv[2]
    compile(argv[2], "<command>", "exec")  # the one-liner is valid Python


# --- hub ids, revisions, the cache ---------------------------------------------------------

@pytest.mark.parametrize("bad", ["org/na..me", "org/" + "n" * 97, "org/name--x", "org/-name", "org/name.git"])
def test_invalid_hub_ids_are_d3m_errors(bad):
    with pytest.raises(D3MModelError, match="not a valid Hugging Face hub id|not a Hugging Face hub id"):
        resolve_model(bad)


@pytest.mark.parametrize("bad", ["main; rm -rf ~", "../../etc", "$(reboot)", "a b", "x" * 300])
def test_revisions_holding_shell_or_paths_are_refused(bad):
    with pytest.raises(D3MModelError, match="revision must be a branch, tag or commit"):
        resolve_model("some-org/model", revision=bad)


def test_suggested_download_command_is_quoted(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(D3MModelError) as info:
        resolve_model("some-org/not-here", revision="v1+x")
    command = str(info.value).split("`")[1]
    assert shlex.split(command) == ["hf", "download", "some-org/not-here", "--revision", "v1+x"]


def test_incomplete_cached_snapshot_names_the_fix(folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    partial = shutil.copytree(folders["sd15"], tmp_path / "partial")
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    rc.hub_cache(tmp_path / "hub", "runwayml/stable-diffusion-v1-5", partial)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(D3MModelError, match=r"unet/ has no .*incomplete: download it once with `hf download .*allow_download=True"):
        resolve_model("runwayml/stable-diffusion-v1-5")


def test_allow_download_fetches_exactly_the_pinned_files(folders, tmp_path, monkeypatch):
    """A stand-in for the Hub (no network here) serving the full SD 1.5 snapshot: what is asked for."""
    import huggingface_hub
    from huggingface_hub import constants

    full, asked = folders["sd15-full"], []
    served = tmp_path / "served"
    names = sorted(p.relative_to(full).as_posix() for p in full.rglob("*") if p.is_file())

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append(sorted(allow_patterns))
        rc.copy_files(full, served, [n for n in allow_patterns if not (served / n).exists()])
        return str(served)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: names)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("no index to read"))
    path = resolve_model("runwayml/stable-diffusion-v1-5", allow_download=True)
    assert asked[0] == ["model_index.json"]
    assert asked[1] == sorted([*model_files(full).files, *EXTRAS])
    assert model_identity(path) == model_identity(full)
    path16 = resolve_model("runwayml/stable-diffusion-v1-5", allow_download=True, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in asked[-1] and model_identity(path16, "fp16")


# --- d3m-inspect and the card name the variant ------------------------------------------

def _archive_file(gen, path):
    from conftest import make_archive

    base = make_archive(num_classes=2, ipc=1, grid=2, dim=32, fingerprint_size=None)
    d3mfmt.save_file(replace(base, manifest=replace(base.manifest, generator=gen)), path)
    return path


def test_inspect_variant_option_summary_and_card(folders, tmp_path):
    from conftest import run_inspect

    from d3mfmt.card import card_text

    full = folders["sd15-full"]
    recorded = _archive_file(generator_for(full, variant="fp16"), tmp_path / "fp16.d3m")
    # 1. the summary, text and JSON, and the card show generator.model.variant
    text = run_inspect(recorded)
    assert text.exit_code == 0 and ", variant fp16 (files-sha256:" in text.stdout
    assert json.loads(run_inspect("summary", recorded, "--json").stdout)["generator"]["variant"] == "fp16"
    card = card_text(recorded.read_bytes(), "fp16.d3m")
    assert "weight variant `fp16`, content hash" in card and "`*.fp16.safetensors` files" in card
    assert "# renders with the 'fp16' weight variant the archive names" in card
    plain = _archive_file(generator_for(full), tmp_path / "plain.d3m")
    assert json.loads(run_inspect("summary", plain, "--json").stdout)["generator"]["variant"] is None
    assert "variant" not in run_inspect(plain).stdout and "variant" not in card_text(plain.read_bytes(), "p.d3m")
    # 2. --variant reaches RenderOptions: an fp16 pin recorded without its variant renders only with it
    unnamed = generator_for(full, variant="fp16")
    unnamed = _archive_file(replace(unnamed, model=replace(unnamed.model, variant=None)), tmp_path / "unnamed.d3m")
    args = ("preview", unnamed, "--device", "cpu", "--per-class", "1", "-o", tmp_path / "p.png")
    refused = run_inspect(*args)
    assert refused.exit_code == 1 and "d3m-inspect: --variant NAME" in refused.stderr
    assert not (tmp_path / "p.png").exists()
    rendered = run_inspect(*args, "--variant", "fp16")
    assert rendered.exit_code == 0, rendered.stderr
    assert (tmp_path / "p.png").is_file()
