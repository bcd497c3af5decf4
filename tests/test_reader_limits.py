"""What a consumer of an untrusted archive is protected by, and how a trusted one lifts it (issue 20):
strict --json, the label and render-cost limits reachable from D3MDataset and d3m-inspect, the
render cost of the model actually loaded, a bounded preview sheet, inert card text, hub ids and
suggested commands."""

import json
import math
import shlex
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import CPU, make_archive, run_inspect, with_manifest
from hostile_archives import edit

import d3mfmt
from d3mfmt import D3MError, D3MFormatError, RenderLimits, RenderOptions, resolve_archive

ROOT = Path(__file__).resolve().parent.parent
ONEHOT = ROOT / "spec" / "vectors" / "onehot.d3m"  # the built-in model, 2 classes of one 32-px image
TRUSTED = RenderLimits(evaluations=None, latent_pixels=None, per_image=None, total=None)


@pytest.fixture(autouse=True)
def d3m_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(tmp_path / "d3m-cache"))


# -- --json is strict JSON -------------------------------------------------------------


@pytest.mark.parametrize("inversion", [
    {"a": {"val_loss_init": 1e-300, "val_loss_best": 1e300}},  # one change overflows to inf
    {"a": {"val_loss_init": 1e308, "val_loss_best": -1e308}, "b": {"val_loss_init": 1e-300, "val_loss_best": 1e300}},
    {"a": {"val_loss_init": 1.0, "val_loss_best": 1.7e308}, "b": {"val_loss_init": 1.0, "val_loss_best": 1.7e308}},
])
def test_json_summary_is_strict_json_when_the_arithmetic_overflows(tmp_path, inversion):
    path = tmp_path / "x.d3m"
    path.write_bytes(with_manifest(d3mfmt.save(make_archive()), lambda d: d.update(build={"inversion": inversion})))
    out = run_inspect("summary", path, "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout, parse_constant=lambda name: pytest.fail(f"--json printed {name}"))
    inv = doc["inversion"]
    assert inv["classes"] == len(inversion) and inv["improved"] + inv["unreadable"] <= len(inversion)
    assert inv["mean_val_loss_change"] is None or math.isfinite(inv["mean_val_loss_change"])
    assert "inf" not in run_inspect("summary", path).stdout.lower()


# -- label and render-cost limits: reachable, and lifted only on request ----------------


def costly(tmp_path) -> Path:
    """The built-in model's archive asking 500 DDIM steps (with guidance: 1,000 evaluations per image)."""
    path = tmp_path / "costly.d3m"
    path.write_bytes(edit(ONEHOT.read_bytes(), "generator", "steps", 500))
    return path


def test_inspect_refuses_a_costly_archive_unless_trusted(tmp_path):
    path = costly(tmp_path)
    for mode in (["summary"], ["check"], ["export", "embeddings"]):
        extra = ["-o", tmp_path / f"emb-{len(mode)}"] if mode[0] == "export" else []
        out = run_inspect(*mode, path, *extra)
        assert out.exit_code == 1 and "UNet evaluations per image" in out.stderr, (mode, out.output)
        assert "--trust-render-cost" in out.stderr and "RenderLimits(evaluations=...)" in out.stderr
        out = run_inspect(*mode, path, *extra, "--trust-render-cost")
        assert out.exit_code == 0, (mode, out.output)
    with pytest.raises(D3MFormatError, match="UNet evaluations"):
        d3mfmt.load_file(path)
    assert d3mfmt.load_file(path, render_limits=TRUSTED).manifest.generator.steps == 500


def test_dataset_takes_render_limits_and_max_label_bytes(tmp_path):
    from d3mfmt import D3MDataset

    path = costly(tmp_path)
    with pytest.raises(D3MFormatError, match="UNet evaluations.*render=RenderOptions\\(limits="):
        D3MDataset(path, render=CPU)
    ds = D3MDataset(path, render=replace(CPU, limits=TRUSTED))
    assert ds.render.limits == TRUSTED and ds.archive.manifest.generator.steps == 500
    ds._archive = None  # as in a DataLoader worker: reloaded under the same limits
    assert ds.archive.manifest.generator.steps == 500
    with pytest.raises(D3MFormatError, match="exceeds this reader.s cap of 1 bytes"):
        D3MDataset(ONEHOT, render=CPU, max_label_bytes=1)
    for bad in (0, -1, True, "1"):
        with pytest.raises(D3MError, match="max_label_bytes must be a positive integer"):
            D3MDataset(ONEHOT, render=CPU, max_label_bytes=bad)
    with pytest.raises(D3MError, match="RenderOptions.limits must be a d3mfmt.RenderLimits"):
        D3MDataset(ONEHOT, render=RenderOptions(device="cpu", limits={"total": None}))


def test_inspect_max_label_bytes_reaches_the_reader(tmp_path):
    for mode in (["summary"], ["check"]):
        out = run_inspect(*mode, ONEHOT, "--max-label-bytes", "1")
        assert out.exit_code == 1 and "cap of 1 bytes" in out.stderr and "--max-label-bytes" in out.stderr
        assert run_inspect(*mode, ONEHOT, "--max-label-bytes", str(1 << 31)).exit_code == 0
    out = run_inspect("summary", ONEHOT, "--max-label-bytes", str((1 << 31) + 1))
    assert out.exit_code == 2 and "--max-label-bytes" in out.stderr


def test_regenerator_bounds_the_cost_by_the_model_it_loads(tiny_model, tiny_archive_path):
    from d3mfmt.generator import Regenerator

    archive = d3mfmt.load_file(tiny_archive_path)  # the tiny model: a UNet of 16 x 16 latents
    gen = archive.manifest.generator
    # 128 px = 64 x 64 latents: within the reader's defaults (SD's size), 16x the tiny UNet's own
    big = replace(gen, height=128, width=128, latent_shape=(4, 64, 64))
    d3mfmt.renderable.check_cost(big, 12)  # the reader, which cannot know the model behind a path, accepts it
    with pytest.raises(D3MFormatError, match=r"4,096 latent pixels per image.*loaded model .*UNet sample size 16\)'s "
                                             r"limit of 1,024"):
        Regenerator(big, archive.embeddings, CPU)
    regen = Regenerator(big, archive.embeddings, replace(CPU, limits=TRUSTED))  # trusted: the caller's limits
    assert regen.info.height == 128


# -- a bounded preview sheet -------------------------------------------------------------


def test_preview_of_many_classes_is_refused_before_anything_is_allocated(tmp_path):
    from d3mfmt import D3MDataset
    from d3mfmt.export import MAX_PREVIEW_CLASSES, preview_grid

    path = tmp_path / "many.d3m"
    d3mfmt.save_file(make_archive(num_classes=2000, ipc=1, grid=1, fingerprint_size=None,
                                  encoding=d3mfmt.LabelEncoding("topk", 2, "u8sqrt")), path)
    ds = D3MDataset(path, render=CPU)  # the model is never loaded: the test model does not exist
    tracemalloc.start()
    with pytest.raises(D3MError, match=f"a preview sheet shows 1..{MAX_PREVIEW_CLASSES} classes, 2000 were asked"):
        preview_grid(ds, list(range(2000)))
    assert tracemalloc.get_traced_memory()[1] < 1 << 20  # the whole sheet would be 2000 x 1166 x 132 px x 3
    tracemalloc.stop()
    out = run_inspect("preview", path, "-o", tmp_path / "p.png", "--select", ",".join(map(str, range(100))))
    assert out.exit_code == 1 and "--select" in out.stderr and not (tmp_path / "p.png").exists()


def test_preview_without_select_shows_the_first_sheet_and_says_so(tmp_path, monkeypatch):
    from d3mfmt import export

    monkeypatch.setattr(export, "MAX_PREVIEW_CLASSES", 1)
    out = run_inspect("preview", ONEHOT, "-o", tmp_path / "p.png", "--device", "cpu")
    assert out.exit_code == 0, out.output
    assert "showing the first 1 of 2 classes" in out.stderr and "--select" in out.stderr
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size[1] == 132  # one row


@pytest.mark.parametrize("spec", ["\u00b2", "1\u00b2", "\u0663"])  # isdigit() takes them, int() may not
def test_select_with_unicode_digits_is_a_message(tmp_path, spec):
    out = run_inspect("preview", ONEHOT, "-o", tmp_path / "p.png", "--select", spec, "--device", "cpu")
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit) and "is not a class index" in out.stderr


# -- card text: no autolinks from manifest strings -----------------------------------------


def test_card_text_autolinks_no_url_or_address_from_the_manifest():
    from d3mfmt.card import card_text, md_escape

    assert md_escape("see https://evil.example/x") == "see https\\://evil.example/x"
    assert md_escape("www.evil.example") == "www\\.evil.example"
    assert md_escape("bob@evil.example") == "bob@&#8288;evil.example"
    assert md_escape("ratio 1:2 at 10.5") == "ratio 1:2 at 10.5"  # ordinary text untouched
    base = make_archive()
    classes = (d3mfmt.ClassInfo("c0", "https://evil.example/a"), d3mfmt.ClassInfo("c1", "mail me@evil.example"),
               d3mfmt.ClassInfo("c2", "www.evil.example"))
    build = {"homepage": "http://evil.example", "contact": "a@b.example", "mirror": "ftp://evil.example/x"}
    ds = replace(base.manifest.dataset, name="from https://evil.example", classes=classes,
                 source=d3mfmt.SourceInfo("www.evil.example", None, "see http://evil.example/licence"))
    text = card_text(d3mfmt.save(replace(base, manifest=replace(base.manifest, dataset=ds, build=build))), "x.d3m")
    body = text.split("\n---\n", 1)[1]
    prose = "\n".join(line for line in body.splitlines() if "`" not in line)  # code spans do not autolink
    for raw in ("https://evil", "http://evil", "ftp://evil", "www.evil", "me@evil", "a@b.example"):
        assert raw not in prose, raw
    assert "https\\://evil.example/a" in body and "me@&#8288;evil.example" in body


# -- hub ids and suggested commands ----------------------------------------------------------


@pytest.mark.parametrize("ref, message", [
    ("hf://datasets/org/na..me/x.d3m", "not a valid Hugging Face hub id"),
    ("hf://datasets/org/name./x.d3m", "not a valid Hugging Face hub id"),
    ("hf://datasets/org/" + "a" * 100 + "/x.d3m", "not a valid Hugging Face hub id"),
    ("hf://datasets/org/name@%3Brm%20-rf%20~/x.d3m", "revision must be a branch, tag or commit"),
    ("hf://datasets/org/name@a..b/x.d3m", "revision must be a branch, tag or commit"),
])
def test_bad_hub_ids_and_revisions_are_d3m_errors(ref, message):
    with pytest.raises(D3MError, match=message):
        resolve_archive(ref)
    out = run_inspect("summary", ref)
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit) and message in out.stderr


def test_hub_download_hint_is_quoted(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(D3MError) as err:
        resolve_archive("hf://datasets/org/name@refs%2Fpr%2F1/my sets/x $(id).d3m")
    command = str(err.value).split("`")[1]
    assert shlex.split(command) == ["hf", "download", "--repo-type", "dataset", "org/name", "my sets/x $(id).d3m",
                                    "--revision", "refs/pr/1"]


def test_model_hints_say_which_tool_takes_which_switch():
    from d3mfmt.models import resolve_model

    with pytest.raises(D3MError) as err:
        resolve_model("org/not-cached-anywhere", "v1")
    message = str(err.value)
    assert "`hf download org/not-cached-anywhere --revision v1`" in message
    assert "allow_download=True in Python" in message and "d3m-inspect: --allow-download" in message
    assert "d3m-build: run the command first" in message


def test_loading_a_tensor_heavy_archive_holds_the_file_and_one_copy_of_its_arrays(tmp_path):
    path = tmp_path / "heavy.d3m"
    d3mfmt.save_file(make_archive(num_classes=64, ipc=1, grid=1, n_vectors=16, dim=2048, emb_dtype="float32",
                                  fingerprint_size=None, encoding=d3mfmt.LabelEncoding("topk", 2, "u8sqrt")), path)
    size = path.stat().st_size  # 8 MiB, nearly all embeddings
    tracemalloc.start()
    try:
        archive = d3mfmt.load_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert archive.embeddings.nbytes > 0.99 * size
    assert peak < 2.1 * size, f"peak {peak / size:.2f}x the file"  # the bytes read, and the arrays copied out once
