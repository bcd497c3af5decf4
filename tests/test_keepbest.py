"""Render-scored keep-best: the stored vector is the candidate that renders its class best (built-in model)."""

import numpy as np
import torch

from builder.initialisers import initial_vectors
from builder.inversion import InversionSettings, invert_class_token
from builder.keepbest import Candidate, choose_candidate, render_scorer, scoring_seeds
from builder.labelling import class_seeds
from builder.model import generator_info
from builder.patches import make_collages
from builder.settings import demo_settings, resolve_settings
from builder.sources import MnistSource
from builder.teachers import resolve_teacher
from d3mfmt import RenderOptions
from d3mfmt.generator import shared_pipeline
from d3mfmt.modelpin import model_files, model_identity
from d3mfmt.models import resolve_model


def test_a_run_whose_late_vectors_render_worse_keeps_the_earlier_one():
    # at lr 3e-2 the validation loss keeps falling (lowest at the last step) while the renders get worse
    path = resolve_model("d3m/tiny-mnist")
    pipe = shared_pipeline(path, model_identity(path), "cpu", "float32")
    s = resolve_settings(demo_settings(ipc=2), 32)
    gen = generator_info(s, pipe, model_files(path), "float32")
    teacher, _ = resolve_teacher("mnist-cnn")
    collages = make_collages(MnistSource("train").images(7, side=32, limit=16), 2)
    score = render_scorer(gen, teacher, 7, scoring_seeds(0, 7, 4, exclude=[]), 2, RenderOptions(device="cpu", dtype=gen.dtype))
    settings = InversionSettings(steps=20, lr=3e-2, batch=4, val_size=8, val_every=5, render_every=5, render_images=4)
    vectors, _, stats = invert_class_token(pipe, collages, "seven", gen.prompt_template, gen.placeholder, settings,
                                           torch.Generator().manual_seed(1), torch.Generator().manual_seed(2),
                                           render_score=score)
    val, render = dict(stats["val_curve"]), dict(stats["render_curve"])
    assert sorted(render) == [0, 5, 10, 15, 20] and min(val, key=val.get) == 20  # validation alone would keep step 20
    assert render[20] < render[0]
    kept = max(render, key=lambda step: (render[step], -val[step]))
    assert stats["best_step"] == kept != 20 and stats["render_best"] == render[kept] >= stats["render_init"]
    assert stats["val_loss_best"] == val[kept]
    if kept == 0:
        np.testing.assert_array_equal(vectors, initial_vectors(pipe, "seven", 1, "object")[0].numpy())
    # the scorer is deterministic: the kept vector scores again what was recorded
    assert score([vectors]) == [stats["render_best"]]


def test_ties_go_to_the_lower_validation_loss_then_the_earlier_step():
    vec = np.zeros((1, 4), np.float32)
    cands = [Candidate(0, 0.5, vec), Candidate(10, 0.4, vec), Candidate(20, 0.4, vec), Candidate(30, 0.1, vec)]
    assert choose_candidate(cands, [0.5, 0.75, 0.75, 0.5]) == 1
    assert choose_candidate(cands, [0.9, 0.75, 0.75, 0.5]) == 0
    assert choose_candidate(cands, [0.5, 0.5, 0.5, 0.5]) == 3


def test_scoring_seeds_are_fixed_and_never_the_archives():
    archive = class_seeds(0, 3, 40)
    seeds = scoring_seeds(0, 3, 4, exclude=archive)
    assert seeds == scoring_seeds(0, 3, 4, exclude=archive) and len(set(seeds)) == 4
    assert not set(seeds) & set(archive) and seeds != scoring_seeds(0, 4, 4, exclude=archive)
    assert scoring_seeds(0, 3, 4, exclude=seeds[:1]) == scoring_seeds(0, 3, 5, exclude=[])[1:]
