"""Textual inversion keeps the best vector on a fixed validation set (tiny random model)."""

import numpy as np
import pytest
import torch

from builder.denoising import draw_validation_set, encode_latents, sample_timesteps, validation_loss
from builder.initialisers import initial_vectors
from builder.inversion import InversionSettings, invert_class_token
from d3mfmt.generator import shared_pipeline
from d3mfmt.modelpin import model_identity
from d3mfmt.prompts import placeholder_prompt

TEMPLATE = "a photo of {token}"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return shared_pipeline(tiny_model, model_identity(tiny_model), "cpu", "float32")


@pytest.fixture(scope="module")
def collages():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g)


def invert(pipe, collages, **kw):
    settings = InversionSettings(**{"steps": 12, "batch": 4, "val_size": 8, "val_every": 3, **kw})
    return invert_class_token(pipe, collages, "a", TEMPLATE, "{token}", settings,
                              torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))


def test_stratified_timesteps_cover_the_schedule():
    t = sample_timesteps(10, 1000, "stratified", torch.Generator().manual_seed(0))
    assert torch.equal(t // 100, torch.arange(10))


def test_huge_learning_rate_keeps_the_initial_word():
    # on the built-in model the class word is what it was trained on: a huge step can only lose it
    from builder.patches import make_collages
    from builder.sources import MnistSource
    from d3mfmt.models import BUILTIN_MODELS, resolve_model

    path = resolve_model("d3m/tiny-mnist")
    mnist = shared_pipeline(path, model_identity(path), "cpu", "float32")
    collages = make_collages(MnistSource("train").images(7, side=32, limit=8), 2)
    template = BUILTIN_MODELS["d3m/tiny-mnist"].collage_template.replace("{}", "{token}")
    settings = InversionSettings(steps=4, lr=50.0, batch=4, val_size=8, val_every=2)
    vectors, _, stats = invert_class_token(mnist, collages, "seven", template, "{token}", settings,
                                           torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    assert [step for step, _ in stats["val_curve"]] == [0, 2, 4]
    assert all(loss > stats["val_loss_init"] for _, loss in stats["val_curve"][1:])
    assert stats["best_step"] == 0 and stats["val_loss_best"] == stats["val_loss_init"]
    np.testing.assert_array_equal(vectors, initial_vectors(mnist, "seven", 1, "object")[0].numpy())


def test_sane_learning_rate_improves_and_returns_the_vector_it_scored(pipe, collages):
    vectors, _, stats = invert(pipe, collages, lr=1e-2)
    assert [step for step, _ in stats["val_curve"]] == [0, 3, 6, 9, 12]
    best_step, best = min(stats["val_curve"], key=lambda x: x[1])
    assert (stats["best_step"], stats["val_loss_best"]) == (best_step, best) and best_step > 0
    assert stats["val_loss_best"] < stats["val_loss_init"] == stats["val_curve"][0][1]
    assert not np.array_equal(vectors, initial_vectors(pipe, "a", 1, "object")[0].numpy())
    # rescoring the returned vector on the same validation triples gives the recorded best loss
    ids, slots = placeholder_prompt(pipe, TEMPLATE, "{token}", 1)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    val = draw_validation_set(encode_latents(pipe, collages), 8, sched.config.num_train_timesteps,
                              torch.Generator().manual_seed(2))
    table = pipe.text_encoder.get_input_embeddings().weight
    saved = table[slots].detach().clone()
    with torch.no_grad():
        table[slots] = torch.from_numpy(vectors)
    try:
        assert validation_loss(pipe, ids, val, sched, 4) == pytest.approx(stats["val_loss_best"], rel=1e-5)
    finally:
        with torch.no_grad():
            table[slots] = saved


def test_validation_does_not_change_the_training_stream(pipe, collages):
    # the same training run, validated on other triples and at other steps, ends on the same last vector
    _, curve_a, _ = invert(pipe, collages, lr=1e-2, val_size=8, val_every=3)
    _, curve_b, _ = invert(pipe, collages, lr=1e-2, val_size=5, val_every=4)
    assert curve_a == curve_b


@pytest.mark.parametrize("bad, message", [
    (dict(val_every=0), "val_every must be >= 1"),
    (dict(val_size=0), "val_size must be >= 1"),
    (dict(timesteps="late"), "timesteps must be one of uniform, stratified"),
])
def test_bad_validation_settings_are_refused(bad, message):
    from builder.settings import check_settings, demo_settings
    from d3mfmt import D3MError

    with pytest.raises(D3MError, match=message):
        check_settings(demo_settings(inversion=InversionSettings(**bad)))
