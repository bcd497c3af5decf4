"""A randomly initialised pipeline with Stable Diffusion 1.5's architecture, and a 2-class smoke build on it.

No real weights can be downloaded here, so this builds SD 1.5's component
*configurations* with random weights: pixels are noise, but every shape,
width and code path is the real one (768-wide text embeddings, 77 tokens,
64x64x4 latents at 512 px, fp16 on disk).

- UNet: blocks 320/640/1280/1280, 2 layers per block, cross-attention 768,
  8 heads, sample size 64 (about 860M parameters).
- VAE: blocks 128/256/512/512, 2 layers per block, 4 latent channels,
  scaling factor 0.18215, sample size 512 (about 84M).
- Text encoder: CLIP ViT-L/14 text tower sizes: 768 wide, 12 layers, 12 heads,
  intermediate 3072, 77 positions (about 85M plus the vocabulary).
- Tokenizer: the built-in tiny-mnist CLIP tokenizer (581 tokens) with
  ``model_max_length`` 77; the text encoder's vocabulary matches it.
- Scheduler: DDIM with SD 1.5's noise schedule.

``TINY`` is the same family at toy widths, for quick CPU runs of the same code.

Usage (CPU smoke: build 2 classes at 256 px, then D3MDataset, ``d3m-inspect verify``
and ``export embeddings`` + diffusers ``load_textual_inversion``; about 2 GB of disk
and 5 GB of RAM; ~10 minutes on 2 CPU cores)::

    HF_HUB_OFFLINE=1 python examples/sd15_random.py --out /tmp/sd15-smoke [--resolution 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "d3mfmt" / "weights" / "tiny-mnist" / "tokenizer"
TEACHER = "examples.sd15_random:two_class_teacher"  # a module:function teacher spec (needs ROOT on sys.path)


@dataclass(frozen=True)
class SDConfig:
    """The component sizes that differ between SD 1.5 and the toy version."""

    unet_channels: tuple[int, ...]
    unet_heads: int
    vae_channels: tuple[int, ...]
    layers_per_block: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    resolution: int  # native pixels
    norm_groups: int = 32


SD15 = SDConfig((320, 640, 1280, 1280), 8, (128, 256, 512, 512), 2, 768, 12, 12, 3072, 512)
TINY = SDConfig((32, 64), 2, (32, 64), 1, 32, 2, 2, 64, 64, norm_groups=16)
MAX_TOKENS = 77


def build_random_sd(folder: Path, config: SDConfig = SD15, seed: int = 0, dtype=torch.float16) -> Path:
    """Write a random pipeline of ``config``'s sizes to ``folder`` (a diffusers folder, ``dtype`` weights)."""
    pipe = random_sd_pipeline(config, seed)
    pipe.to(dtype)
    pipe.save_pretrained(folder)
    return Path(folder)


def random_sd_pipeline(config: SDConfig = SD15, seed: int = 0):
    """A StableDiffusionPipeline of ``config``'s sizes, random weights (``torch.device("meta")``: shapes only)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    # 1. tokenizer: the built-in one, 77 positions like CLIP's
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=MAX_TOKENS)
    # 2. text encoder: CLIP ViT-L/14's text tower sizes, vocabulary = the tokenizer's
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=MAX_TOKENS, projection_dim=config.text_width, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    # 3. VAE: 8x downsampling at SD sizes, SD's latent scaling
    n_vae = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=config.vae_channels,
        layers_per_block=config.layers_per_block, norm_num_groups=config.norm_groups,
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        sample_size=config.resolution, scaling_factor=0.18215,
    )
    # 4. UNet: SD 1.5's block layout (cross-attention everywhere but the deepest block)
    n = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 2 ** (n_vae - 1), in_channels=4, out_channels=4,
        layers_per_block=config.layers_per_block, block_out_channels=config.unet_channels,
        norm_num_groups=config.norm_groups, cross_attention_dim=config.text_width,
        attention_head_dim=config.unet_heads,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


class ChannelTeacher(torch.nn.Module):
    """Two classes: red-dominant vs green-dominant (logits = 8 x mean of channels 0 and 1)."""

    def forward(self, x):
        return 8.0 * x.mean(dim=(2, 3))[:, :2]


def two_class_teacher() -> torch.nn.Module:
    """``--teacher examples.sd15_random:two_class_teacher`` (module:function spec)."""
    return ChannelTeacher()


def make_two_class_folder(root: Path, per_class: int = 4, side: int = 96) -> Path:
    """An ImageFolder of noisy red-ish and green-ish PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("a_red", "b_green")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (side, side, 3))
            pixels[..., c] += 120
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def smoke(out: Path, config: SDConfig = SD15, resolution: int = 256, steps: int = 2, ti_steps: int = 2,
          device: str = "cpu") -> dict:
    """Build a 2-class IPC-1 archive on a random ``config`` model, then read it every way a consumer does.

    Returns a dict of what was checked and how long each part took.
    """
    import safetensors.torch
    from click.testing import CliRunner
    from diffusers import StableDiffusionPipeline

    import d3mfmt
    from builder.assemble import write_archive
    from builder.inversion import InversionSettings
    from builder.patches import PatchSettings
    from builder.pipeline import build
    from builder.settings import BuildSettings, RunOptions
    from builder.sources import ImageFolderSource
    from d3mfmt import D3MDataset, LabelEncoding, RenderOptions
    from d3mfmt.cli import inspect_main
    from d3mfmt.generator import Regenerator

    out = Path(out)
    times = {}
    t0 = time.perf_counter()
    model = build_random_sd(out / "model", config)
    times["construct_s"] = time.perf_counter() - t0
    # 1. the build, from the library: 2 classes, IPC 1, a module:function teacher
    data = make_two_class_folder(out / "data")
    settings = BuildSettings(
        model=str(model), teacher=TEACHER, ipc=1, grid=2,
        resolution=resolution, steps=steps, guidance_scale=2.0, prompt_template="a photo of {token}",
        patches=PatchSettings(n_crops=2, max_images=4),
        inversion=InversionSettings(steps=ti_steps, batch=1),
    )
    t0 = time.perf_counter()
    wd = build(ImageFolderSource(data), settings, out / "work", run=RunOptions(device=device, progress=False))
    archive_path = out / "smoke.d3m"
    archive = write_archive([wd.path], archive_path, LabelEncoding(), "sd15-random-smoke")
    times["build_s"] = time.perf_counter() - t0
    gen = archive.manifest.generator
    # 2. D3MDataset: patches with their labels
    t0 = time.perf_counter()
    ds = D3MDataset(archive_path, cache_dir=out / "cache", render=RenderOptions(device=device))
    image, label, cls = ds[len(ds) - 1]
    times["dataset_s"] = time.perf_counter() - t0
    # 3. d3m-inspect verify and export embeddings, in this process (the model is loaded once)
    t0 = time.perf_counter()
    verified = CliRunner().invoke(inspect_main, ["verify", str(archive_path), "--device", device, "--images", "2"])
    times["verify_s"] = time.perf_counter() - t0
    exported = CliRunner().invoke(inspect_main, ["export", "embeddings", str(archive_path),
                                                 "-o", str(out / "embeddings")])
    # 4. the exported files, loaded by diffusers' own textual-inversion loader
    tensors, tokens = [], []
    for path in sorted((out / "embeddings").glob("*.safetensors")):
        (token, tensor), = safetensors.torch.load_file(path).items()
        tokens.append(token)
        tensors.append(tensor)
    regen = Regenerator(gen, archive.embeddings, RenderOptions(device=device))
    # a fresh text encoder and tokenizer (the loader grows them); UNet and VAE shared, not loaded twice
    pipe = StableDiffusionPipeline.from_pretrained(model, unet=regen.pipe.unet, vae=regen.pipe.vae,
                                                   torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.load_textual_inversion(tensors, token=tokens)
    prompt_diff = 0.0
    for c, token in enumerate(tokens):  # (pipeline text encoders are not frozen: no autograd graph here)
        with torch.no_grad():
            theirs, _ = pipe.encode_prompt(gen.prompt_template.replace("{token}", token), device, 1, False)
        prompt_diff = max(prompt_diff, float((regen.prompt_embeds(c) - theirs).abs().max()))
    del pipe
    return {
        "embedding_shape": list(archive.embeddings.shape),
        "latent_shape": list(gen.latent_shape),
        "prompt_tokens": int(regen.prompt_embeds(0).shape[1]),
        "patch_shape": list(image.shape),
        "label_sum": float(label.sum()),
        "class_of_last_item": int(cls),
        "verify_exit_code": verified.exit_code,
        "verify_output": verified.output.strip().splitlines(),
        "export_exit_code": exported.exit_code,
        "exported_tokens": tokens,
        "textual_inversion_prompt_max_diff": prompt_diff,
        "d3mfmt": d3mfmt.__version__,
        **{k: round(v, 1) for k, v in times.items()},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="an empty or new folder (about 2 GB)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps")
    parser.add_argument("--ti-steps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the toy-width config instead of SD 1.5's")
    parser.add_argument("--keep", action="store_true", help="keep the model and archive in --out")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # the teacher spec and the packages, when run as a script
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"--out {args.out} exists and is not empty; pick a new folder")
    try:
        result = smoke(args.out, TINY if args.tiny else SD15, args.resolution, args.steps, args.ti_steps)
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
