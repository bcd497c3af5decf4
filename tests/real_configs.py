"""Pipelines with the exact config files of real Stable Diffusion checkpoints, tiny random weights inside.

The config files under ``tests/data/real_configs/`` are copies of the ones the
checkpoints ship; :data:`SHRUNK` lists the only keys this module changes (the
size fields: channels, layers, heads), so that the weights are
tiny and random while every other key is as shipped. Sources:

- ``sd15/``: runwayml/stable-diffusion-v1-5 (the Hub repository's own files,
  mirrored with its history on GitHub in HDRJ-One/runwayml-stable-diffusion-v1-5,
  commit 5fa07f3d12dcbb53b244e22c30126d8b471f7e02): ``model_index.json`` with
  ``PNDMScheduler``, ``safety_checker`` and ``feature_extractor`` entries, a VAE
  config from diffusers 0.6.0 without ``force_upcast`` or ``scaling_factor``.
- ``sd21base/``: stabilityai/stable-diffusion-2-1-base, mirrored in
  jack-op11/stable-diffusion-2-1-base (commit 88bb1a46821197d1ac0cb54d1d09fb6e70b171bc):
  PNDM with ``prediction_type`` epsilon, gelu text encoder (23 layers, 1024 wide),
  ``use_linear_projection``.
- ``sd21/``: stabilityai/stable-diffusion-2-1 (768 px, DDIM ``v_prediction``), vendored
  under ``stable-diffusion-2-1/`` in Luoyukeji/static-f (commit
  899bfe38299b424751fecc2e03af051ddc66ba02), whose checkout has CRLF line ends:
  converted back to LF (its merges.txt then hashes to the Hub's).
- ``sdxl/``: an SDXL snapshot (``StableDiffusionXLPipeline``, diffusers 0.24.0.dev0,
  ``text_encoder_2`` = ``CLIPTextModelWithProjection``), vendored in
  Guang000/Generative-Dataset-Distillation-Based-on-Diffusion-Model (commit
  10cf7f0301fea879cee0d09e8f4cfcaab050e099).
- The tokenizer: the real 49,408-token CLIP BPE (``bpe_simple_vocab_16e6.txt.gz`` in the
  ``open_clip_torch`` wheel, a test extra installed with ``--no-deps``), turned
  into ``vocab.json`` and ``merges.txt`` as OpenAI's ``SimpleTokenizer`` defines the
  vocabulary; the bytes equal the files SD 1.5 and 2.x ship (:data:`HUB_TOKENIZER_SHA256`).

:func:`write_pipeline` writes one of these as a diffusers folder: the
diffusers files only (what ``allow_download`` fetches), or a full snapshot with
the root single-file checkpoints, fp16 / non-EMA duplicates, pickle-named
``.bin`` copies and the safety checker. :func:`hub_cache` lays a folder out as a
Hugging Face cache snapshot (``blobs/`` named by sha256 or git hash,
``snapshots/<commit>/`` symlinks, ``refs/main``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "real_configs"
MODELS = ("sd15", "sd21", "sd21base", "sdxl")
HUB_TOKENIZER_SHA256 = {  # tokenizer/ of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1(-base)
    "vocab.json": "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349",
    "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
}
_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
         "projection_dim": 32}
_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
_UNET = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 32}
SHRUNK = {  # model -> config file -> the size keys replaced (everything else, sample sizes too, as shipped)
    "sd15": {"unet/config.json": _UNET, "vae/config.json": _VAE, "text_encoder/config.json": _TEXT},
    "sd21": {"unet/config.json": {**_UNET, "attention_head_dim": [2, 2, 4, 4]}, "vae/config.json": _VAE,
             "text_encoder/config.json": _TEXT},
    "sd21base": {"unet/config.json": {**_UNET, "attention_head_dim": [2, 2, 4, 4]}, "vae/config.json": _VAE,
                 "text_encoder/config.json": _TEXT},
    "sdxl": {"unet/config.json": {"block_out_channels": [32, 64, 64], "layers_per_block": 1,
                                  "attention_head_dim": [2, 4, 4], "transformer_layers_per_block": [1, 1, 1],
                                  "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                                  "projection_class_embeddings_input_dim": 6 * 8 + 32},
             "vae/config.json": _VAE, "text_encoder/config.json": _TEXT, "text_encoder_2/config.json": _TEXT},
}
PIXELS = 64  # tests render this size (sample sizes stay as shipped: 512 / 768 px; they set defaults, not weights)
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
LDM_KEYS = (  # a few real key names of the original single-file layout (v1-5-pruned-emaonly.safetensors)
    "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
    "first_stage_model.decoder.conv_in.weight", "first_stage_model.encoder.conv_in.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
)


@functools.lru_cache(maxsize=1)
def clip_tokenizer_files() -> dict[str, bytes]:
    """``vocab.json`` and ``merges.txt`` of the CLIP tokenizer, from the BPE file in the open_clip_torch wheel."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (it needs torch deps)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the real-config fixtures need the open_clip_torch wheel: "
                           "pip install --no-deps open_clip_torch (make setup does)")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({t: i for i, t in enumerate(vocab)}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    merges_txt = "#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n"
    return {"vocab.json": vocab_json.encode("utf-8"), "merges.txt": merges_txt.encode("utf-8")}


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable character table (simple_tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def config(model: str, rel: str) -> dict:
    """A shipped config file of ``model`` with :data:`SHRUNK`'s size keys replaced (key order kept)."""
    doc = json.loads((DATA / model / rel).read_text())
    for key, value in SHRUNK[model].get(rel, {}).items():
        assert key in doc, f"{model}/{rel} has no {key}: the shrink table is out of date"
        doc[key] = value
    return doc


def _save_weights(module, path: Path, dtype=None) -> None:
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def _module(model: str, component: str, folder: Path):
    """A random module of ``component`` built from the (shrunk) config written in ``folder``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if component == "unet":
        return UNet2DConditionModel.from_config(config(model, "unet/config.json"))
    if component == "vae":
        return AutoencoderKL.from_config(config(model, "vae/config.json"))
    text_config = CLIPTextConfig.from_pretrained(folder / component)
    return (CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel)(text_config)


def write_pipeline(model: str, dest: Path, *, variant: str | None = None, full_snapshot: bool = False,
                   seed: int = 0) -> Path:
    """Write ``model`` (one of :data:`MODELS`) as a diffusers folder at ``dest``; return ``dest``.

    ``variant="fp16"`` writes only fp16 weights named ``*.fp16.safetensors`` (what
    ``variant="fp16"`` leaves in a cache). ``full_snapshot`` adds what a full hub
    snapshot also holds; the files rendering loads are the same bytes either way.
    """
    import torch

    torch.manual_seed(seed)
    dest.mkdir(parents=True)
    for src in sorted((DATA / model).rglob("*.json")):  # 1. every config file, shrunk where listed
        rel = src.relative_to(DATA / model).as_posix()
        if rel.startswith(("safety_checker/", "feature_extractor/")) and not full_snapshot:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(json.dumps(config(model, rel), indent=2) + "\n")
    for tok in [d for d in ("tokenizer", "tokenizer_2") if (dest / d).is_dir()]:  # 2. the real CLIP BPE
        for name, data in clip_tokenizer_files().items():
            (dest / tok / name).write_bytes(data)
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for component, prefix in WEIGHT_FILES.items():  # 3. tiny random weights
        if (dest / component).is_dir():
            module = _module(model, component, dest)
            _save_weights(module, dest / component / (prefix + suffix), torch.float16 if variant == "fp16" else None)
            if full_snapshot and variant is None:
                _save_weights(module, dest / component / f"{prefix}.fp16.safetensors", torch.float16)
                (dest / component / f"{prefix.replace('model', 'pytorch_model') if prefix == 'model' else prefix}.bin"
                 ).write_bytes(b"not read: a pickled duplicate stands here in real snapshots")
    if full_snapshot:
        _add_snapshot_extras(model, dest)
    return dest


def _add_snapshot_extras(model: str, dest: Path) -> None:
    """What a full snapshot holds besides the diffusers files: duplicates the pipeline never reads."""
    import torch
    from diffusers import UNet2DConditionModel

    non_ema = UNet2DConditionModel.from_config(config(model, "unet/config.json"))  # other weights, same shapes
    _save_weights(non_ema, dest / "unet" / "diffusion_pytorch_model.non_ema.safetensors")
    for name in ("v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors"):
        single_file_checkpoint(dest / name)
    (dest / "v1-inference.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n")
    (dest / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n")
    if (dest / "safety_checker").is_dir():
        from safetensors.torch import save_file

        save_file({"vision_model.post_layernorm.weight": torch.ones(4)}, str(dest / "safety_checker" / "model.safetensors"))


def single_file_checkpoint(path: Path) -> Path:
    """A tiny original-layout (LDM) checkpoint with real SD key names, as a ``.safetensors`` file."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(len(path.name))
    save_file({key: torch.randn(4, 4) for key in LDM_KEYS}, str(path))
    return path


def copy_files(src: Path, dest: Path, rels) -> Path:
    """A plain copy of some files of a folder (what a consumer might carry over)."""
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)
    return dest


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> Path:
    """Lay ``folder`` out as huggingface_hub's cache does; return the snapshot folder.

    ``models--ORG--NAME/blobs/<etag>`` holds each file once: LFS files (weights)
    under their sha256, git files under their git blob hash; the snapshot holds
    relative symlinks to them, and ``refs/main`` names the commit.
    """
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = src.relative_to(folder)
        data = src.read_bytes()
        lfs = src.suffix in (".safetensors", ".bin", ".ckpt")
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / etag, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
