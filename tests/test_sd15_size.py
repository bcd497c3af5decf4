"""Stable Diffusion 1.5's architecture end to end (random weights): build, dataset, verify, TI export.

Slow (minutes on two CPU cores, ~5 GB of RAM): run with ``--run-slow``.
The same code at toy widths runs by default, so the path stays covered.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # examples/ and the module:function teacher spec

from examples.sd15_random import SD15, TINY, random_sd_pipeline, smoke  # noqa: E402


def check_smoke(result: dict, width: int, latent: list[int]) -> None:
    assert result["embedding_shape"] == [2, 1, width]
    assert result["latent_shape"] == latent
    assert result["prompt_tokens"] == 77
    assert abs(result["label_sum"] - 1) < 1e-5 and result["class_of_last_item"] == 1
    assert result["verify_exit_code"] == 0, result["verify_output"]
    assert "verify OK: 2 images, max drift 0" in result["verify_output"][-1]
    assert result["export_exit_code"] == 0
    assert result["exported_tokens"] == ["<d3m-a_red>", "<d3m-b_green>"]
    assert result["textual_inversion_prompt_max_diff"] <= 1e-5


def test_random_sd15_has_sd15_component_sizes():
    """SD 1.5's configurations, built on the meta device (shapes, no memory, no init time)."""
    import torch

    with torch.device("meta"):
        pipe = random_sd_pipeline(SD15)
    unet, vae, text = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config
    assert tuple(unet.block_out_channels) == (320, 640, 1280, 1280) and unet.layers_per_block == 2
    assert unet.cross_attention_dim == 768 and unet.attention_head_dim == 8 and unet.sample_size == 64
    assert tuple(vae.block_out_channels) == (128, 256, 512, 512) and vae.latent_channels == 4
    assert vae.scaling_factor == 0.18215 and pipe.vae_scale_factor == 8
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
            text.max_position_embeddings) == (768, 12, 12, 3072, 77)
    assert text.vocab_size == len(pipe.tokenizer) and pipe.tokenizer.model_max_length == 77
    millions = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
                for name in ("unet", "vae", "text_encoder")}
    assert 855 < millions["unet"] < 865 and 80 < millions["vae"] < 88, millions  # SD 1.5: 859.5M, 83.7M


def test_toy_width_smoke_runs_the_same_code(tmp_path):
    check_smoke(smoke(tmp_path, TINY, resolution=32), 32, [4, 16, 16])


@pytest.mark.slow
def test_sd15_size_smoke_on_the_cpu(tmp_path):
    result = smoke(tmp_path, SD15, resolution=128)
    check_smoke(result, 768, [4, 16, 16])
