"""Class tokens start from the class's own name, read by the real 49,408-token CLIP tokenizer (tests/real_configs.py)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_teacher import make_imagefolder

import d3mfmt
import real_configs as rc
from builder.cli import main
from builder.initialisers import head_name, initial_vectors, mean_token_norm
from d3mfmt.generator import shared_pipeline
from d3mfmt.modelpin import model_identity


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    path = rc.write_pipeline("sd15", tmp_path_factory.mktemp("init") / "sd15")
    return path, shared_pipeline(path, model_identity(path), "cpu", "float32")


def token_rows(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, add_special_tokens=False).input_ids
    return pipe.text_encoder.get_input_embeddings().weight.detach()[ids].float()


def test_head_name_is_the_wordnet_head_word():
    assert head_name("tench, Tinca tinca") == "tench"
    assert head_name("great white shark, white shark, man-eater") == "great white shark"
    assert head_name(", odd") == ", odd"


def test_wordnet_line_starts_from_its_head_words_not_object(sd15):
    _, pipe = sd15
    assert pipe.tokenizer.vocab_size == 49408
    vectors, words = initial_vectors(pipe, "tench, Tinca tinca", 1, "object")
    assert words == ["tench"] and vectors.shape == (1, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(vectors[0], token_rows(pipe, "tench").mean(0))
    assert not torch.allclose(vectors[0], token_rows(pipe, "object").mean(0))
    # each word counts once, however many pieces the tokenizer cuts it into
    vectors, words = initial_vectors(pipe, "great white shark, white shark", 1, "object")
    assert words == ["great", "white", "shark"]
    torch.testing.assert_close(vectors[0], torch.stack([token_rows(pipe, w).mean(0) for w in words]).mean(0))


def test_one_group_of_words_per_slot(sd15):
    _, pipe = sd15
    vectors, words = initial_vectors(pipe, "great white shark", 2, "object")
    rows = [token_rows(pipe, w).mean(0) for w in words]
    torch.testing.assert_close(vectors[0], torch.stack(rows[:2]).mean(0))
    torch.testing.assert_close(vectors[1], rows[2])
    one_word, _ = initial_vectors(pipe, "tench", 3, "object")
    assert all(torch.equal(one_word[k], one_word[0]) for k in range(3))


def test_mean_token_norm_counts_the_vocabulary_only(sd15):
    _, pipe = sd15
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    assert np.isclose(mean_token_norm(pipe), float(table[:49408].norm(dim=1).mean()), rtol=1e-6)


def test_zero_steps_store_and_record_the_names_initialiser(sd15, tmp_path):
    path, pipe = sd15
    data = make_imagefolder(tmp_path / "data", classes=("a_red", "b_green"), per_class=4)
    (tmp_path / "classes.txt").write_text("a_red tench, Tinca tinca\nb_green great white shark, white shark\n")
    out = tmp_path / "names.d3m"
    result = CliRunner().invoke(main, [str(data), "-o", str(out), "--model", str(path), "--classes",
                                       str(tmp_path / "classes.txt"), "--teacher", "tiny_teacher:build_teacher2",
                                       "--ipc", "1", "--grid", "2", "--resolution", str(rc.PIXELS), "--steps", "2",
                                       "--ti-steps", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    archive = d3mfmt.load_file(out)
    inv = archive.manifest.build["inversion"]
    assert inv["a_red"]["init_words"] == ["tench"] and inv["b_green"]["init_words"] == ["great", "white", "shark"]
    for c, name in enumerate(["tench, Tinca tinca", "great white shark, white shark"]):
        expected = initial_vectors(pipe, name, 1, "object")[0].numpy().astype(np.float16)
        np.testing.assert_array_equal(archive.embeddings[c], expected)
