"""A random-initialised tiny Stable Diffusion pipeline on disk, as diffusers' own tests build them.

Pixels are meaningless but fully determined by the seed, which is all the
generator, dataset and CLI tests need; tests that need real digits use the
built-in model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import d3mfmt
from d3mfmt.modelpin import model_identity

TEXT_DIM = 32
SIZE = 32  # pixels; the VAE halves it: latents 4 x 16 x 16


def build_tiny_pipeline(folder: Path) -> Path:
    """Write a random tiny pipeline (CLIP char tokenizer, VAE, UNet, DDIM) to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = folder / "tokenizer_src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=24)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=24, projection_dim=TEXT_DIM,
        bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=TEXT_DIM, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    return folder / "model"


def archive_for(model_dir: Path, num_classes=3, ipc=4, grid=2, n_vectors=1, guidance=2.0, seed=0) -> d3mfmt.Archive:
    """A valid archive whose generator names ``model_dir`` (2 DDIM steps), with real fingerprints."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_archive

    from d3mfmt.generator import Regenerator, fingerprint

    base = make_archive(num_classes, ipc, grid, n_vectors, TEXT_DIM, fingerprint_size=4, seed=seed)
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    gen = replace(
        base.manifest.generator,
        model=d3mfmt.ModelRef(str(model_dir), None, model_identity(model_dir)),
        scheduler_config=config, steps=2, guidance_scale=guidance, height=SIZE, width=SIZE,
        latent_shape=(4, SIZE // 2, SIZE // 2), prompt_template="a photo of {token}",
    )
    archive = replace(base, manifest=replace(base.manifest, generator=gen))
    regen = Regenerator(gen, archive.embeddings, d3mfmt.RenderOptions(device="cpu"))
    prints = np.stack([fingerprint(regen.render(c, archive.seeds[c].tolist()), 4) for c in range(num_classes)])
    return replace(archive, fingerprints=prints)
