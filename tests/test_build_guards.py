"""Own data, safely: the class-order and model-domain guards, required model/teacher, option validation.

The class-order rule is tested on confusion matrices directly; the CLI builds here are one class each.
"""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_teacher import build_permuted_teacher

import d3mfmt
from builder.cli import main
from builder.guards import best_assignment, check_class_order, domain_problems, teacher_confusion
from builder.classlist import read_class_list
from builder.sources import ImageFolderSource
from builder.workdir import Workdir
from d3mfmt import ClassInfo, D3MError


def tiny_args(model):
    """One cheap class build; ``--guidance`` and ``--template`` are the old spellings, kept as aliases."""
    return ["--model", str(model), "--teacher", "tiny_teacher:build_teacher", "--ipc", "1", "--grid", "2",
            "--steps", "2", "--guidance", "2.0", "--template", "a photo of {token}", "--ti-steps", "2",
            "--ti-batch", "2", "--device", "cpu"]


@pytest.fixture
def data(image_folder):
    return image_folder


def test_best_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 6):
        for _ in range(20):
            score = rng.integers(0, 20, (n, n))
            perm = best_assignment(score)
            assert sorted(perm.tolist()) == list(range(n))
            best = max(sum(score[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert score[np.arange(n), perm].sum() == best


def test_class_order_rule_needs_a_permutation_that_fixes_it(tmp_path):
    classes = [ClassInfo(f"f{i}", f"name{i}") for i in range(4)]
    shifted = np.roll(np.eye(4, dtype=int) * 30, 1, axis=1) + 1  # folder c -> logit c+1
    with pytest.raises(D3MError, match=r"folder 'f0' looks like class 1 \('name1'\)"):
        check_class_order(shifted, classes, tmp_path / "x.classes.txt")
    assert (tmp_path / "x.classes.txt").read_text().split("\n")[:4] == ["f3\tname3", "f0\tname0", "f1\tname1", "f2\tname2"]
    # a teacher that takes every class for the same one is unsuited, not misordered: no permutation fixes it
    collapsed = np.zeros((4, 4), int)
    collapsed[:, 2] = 30
    assert check_class_order(collapsed, classes, tmp_path / "y.txt").misordered() == []
    assert not (tmp_path / "y.txt").exists()
    # one swapped pair among many classes is caught on its own (the overall agreement barely moves)
    many = [ClassInfo(f"f{i:03d}", f"f{i:03d}") for i in range(100)]
    swapped = np.eye(100, dtype=int) * 30
    swapped[[0, 1]] = swapped[[1, 0]]
    with pytest.raises(D3MError, match=r"folder 'f000' looks like class 1 .*folder 'f001' looks like class 0"):
        check_class_order(swapped, many, tmp_path / "z.classes.txt")
    assert (tmp_path / "z.classes.txt").read_text().split("\n")[:3] == ["f001", "f000", "f002"]
    assert check_class_order(np.eye(4, dtype=int) * 9, classes, None).agreement.tolist() == [1, 1, 1, 1]


def test_permuted_teacher_stops_before_inversion_and_the_suggested_order_passes(tiny_model, data, tmp_path):
    out = tmp_path / "x.d3m"
    args = [str(data), "-o", str(out), *tiny_args(tiny_model)]
    args[args.index("tiny_teacher:build_teacher")] = "tiny_teacher:build_permuted_teacher"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "folder 'a_red' looks like class 1 ('b_green') on 100% of its images" in result.stderr
    assert "--classes" in result.stderr and "Traceback" not in result.output
    suggestion = tmp_path / "x.classes.txt"
    assert suggestion.read_text() == "c_blue\na_red\nb_green\n"
    # nothing built, nothing half-written: the work directory holds only the preflight (no record, no class)
    assert not out.exists() and [p.name for p in (tmp_path / "x.d3m.work").iterdir()] == ["preflight.json"]
    # in the suggested order the teacher takes every folder for its own class
    ids, names = read_class_list(suggestion)
    counts = teacher_confusion(ImageFolderSource(data, ids, names), build_permuted_teacher(), 16, "cpu")
    report = check_class_order(counts, ImageFolderSource(data, ids, names).classes, None)
    assert report.misordered() == [] and report.agreement.tolist() == [1.0, 1.0, 1.0]
    # and the build takes it (one shard of one class is enough to pass the check), or the override
    again = CliRunner().invoke(main, [*args, "--classes", str(suggestion), "--shard", "0/3"])
    assert again.exit_code == 0, again.output
    record = json.loads((tmp_path / "x.d3m.work" / "settings.json").read_text())
    assert [c["id"] for c in record["classes"]] == ["c_blue", "a_red", "b_green"]
    forced = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "forced.d3m"), "--ignore-class-order",
                                       "--shard", "0/3"])
    assert forced.exit_code == 0, forced.output


def test_domain_guard_warns_records_and_min_agreement_fails(tiny_build, tmp_path):
    # the tiny random model cannot render the coloured images: the teacher sees colour noise
    build = d3mfmt.load_file(tiny_build.out).manifest.build
    real = [build["agreement"][c]["real"] for c in ("a_red", "b_green", "c_blue")]
    regen = [build["agreement"][c]["regenerated"] for c in ("a_red", "b_green", "c_blue")]
    precision = [build["agreement"][c].get("precision") for c in ("a_red", "b_green", "c_blue")]
    low = domain_problems(real, regen, precision)
    assert low, (real, regen)  # the premise of this test: some class renders far below its real agreement
    assert f"WARNING: {len(low)} of 3 classes render poorly" in tiny_build.stderr
    assert "the model does not render this class's images the way your teacher sees them" in tiny_build.stderr
    assert np.isclose(build["regenerated_patch_agreement"], np.mean(regen), atol=1e-4)
    # d3m-inspect shows the agreement and marks the same low classes
    from d3mfmt.cli import inspect_main

    shown = CliRunner().invoke(inspect_main, [str(tiny_build.out)])
    assert shown.exit_code == 0 and f"of regenerated patches (selected real patches: {100 * np.mean(real):.1f}%)" in shown.output
    assert f"LOW         {len(low)} of 3 classes render poorly" in shown.output
    as_json = json.loads(CliRunner().invoke(inspect_main, [str(tiny_build.out), "--json"]).output)
    assert [r["id"] for r in as_json["agreement"]["low"]] == [("a_red", "b_green", "c_blue")[c] for c in low]
    # a threshold above a class's agreement: a clean failure, no archive (the build's own case: below)
    strict = tmp_path / "strict.d3m"
    failed = CliRunner().invoke(main, ["merge", str(tiny_build.workdir), "-o", str(strict),
                                       "--min-agreement", str(min(regen) + 0.01)])
    assert failed.exit_code == 1 and "below --min-agreement" in failed.stderr and "Traceback" not in failed.output
    worst = ("a_red", "b_green", "c_blue")[int(np.argmin(regen))]
    assert f"'{worst}' {100 * min(regen):.0f}% (real 100%)" in failed.stderr
    assert not strict.exists()


def test_domain_rule():
    assert domain_problems([1.0, 1.0, 0.4, None], [0.9, 0.45, 0.3, 0.6]) == [1, 2]
    assert domain_problems([0.9], [0.44]) == [0]  # under half of the real agreement


def test_real_data_needs_model_and_teacher(data, tmp_path):
    result = CliRunner().invoke(main, [str(data), "-o", str(tmp_path / "x.d3m")])
    assert result.exit_code == 1 and "needs --model and --teacher" in result.stderr
    result = CliRunner().invoke(main, [str(data), "-o", str(tmp_path / "x.d3m"), "--model", "d3m/tiny-mnist"])
    assert result.exit_code == 1 and "needs --teacher" in result.stderr
    result = CliRunner().invoke(main, ["--demo", str(data), "-o", str(tmp_path / "x.d3m")])
    assert result.exit_code == 1 and "drop DATA" in result.stderr
    result = CliRunner().invoke(main, ["--demo", "--revision", "main", "-o", str(tmp_path / "x.d3m")])
    assert result.exit_code == 1 and "drop --revision" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option,value,message", [
    ("--ipc", "0", "--ipc must be >= 1, got 0"),
    ("--steps", "0", "--steps must be >= 1, got 0"),
    ("--resolution", "0", "--resolution must be >= 8, got 0"),
    ("--max-images", "0", "--max-images must be >= 1, got 0"),
    ("--n-crops", "-1", "--n-crops must be >= 1, got -1"),
    ("--ti-steps", "-1", "--ti-steps must be >= 0, got -1"),
    ("--ti-lr", "0", "--ti-lr must be a positive number"),
    ("--ti-lr", "nan", "--ti-lr must be a positive number"),
    ("--ti-batch", "0", "--ti-batch must be >= 1, got 0"),
    ("--n-vectors", "0", "--n-vectors must be in 1..16"),
    ("--vectors", "17", "--n-vectors must be in 1..16"),
    ("--guidance-scale", "0.5", "--guidance-scale must be >= 1"),
    ("--guidance", "0.5", "--guidance-scale must be >= 1"),
    ("--grid", "9", "--grid must be in 1..8"),
    ("--seed", "-1", "--seed must be in"),
    ("--seed-candidates", "0", "--seed-candidates must be >= 1"),
    ("--temperature", "0", "--temperature must be a positive number"),
    ("--prompt-template", "no token", "--prompt-template must contain '{token}'"),
    ("--template", "{token} {token}", "--prompt-template must contain '{token}' exactly once"),
    ("--min-agreement", "1.5", "--min-agreement must be a fraction"),
    ("--k", "0", "label options (--label-kind, --k, --values) for 3 classes: labels.k must be in 1..3"),
    ("--shard", "3/2", "--shard 3/2: need 0 <= i < n"),
    ("--classes", "/nonexistent/classes.txt", "--classes /nonexistent/classes.txt"),
])
def test_every_bad_option_is_one_line_before_any_work(data, tmp_path, option, value, message):
    out = tmp_path / "x.d3m"
    result = CliRunner().invoke(main, [str(data), "-o", str(out), "--model", "d3m/tiny-mnist",
                                       "--teacher", "tiny_teacher:build_teacher", option, value])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # no archive, no work directory, no class list


def test_merge_is_its_own_action(tmp_path):
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "nope"), "-o", str(tmp_path / "x.d3m")])
    assert result.exit_code == 1 and "not a d3m-build work directory" in result.stderr
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "merge" in help_text and "build" in help_text


def test_settings_record_the_resolved_model_defaults(tiny_build):
    from builder.settings import STABLE_DIFFUSION

    settings = json.loads((tiny_build.workdir / "settings.json").read_text())["settings"]
    # a folder model is a Stable-Diffusion-family model: its defaults, and the UNet's native size
    assert settings["guidance_scale"] == STABLE_DIFFUSION.guidance_scale
    assert settings["prompt_template"] == STABLE_DIFFUSION.collage_template
    assert settings["inversion"]["lr"] == STABLE_DIFFUSION.ti_lr and settings["inversion"]["batch"] == STABLE_DIFFUSION.ti_batch
    assert settings["inversion"]["steps"] == 4 and settings["steps"] == 2 and settings["resolution"] == 32


@pytest.mark.parametrize("options, message", [
    (["--label-kind", "hard", "--k", "3"], "--label-kind hard stores one class index per patch"),
    (["--labels", "hard", "--values", "u8"], "drop --k, --values and --temperature"),
    (["--label-kind", "dense", "--k", "2"], "--label-kind dense stores every class: drop --k"),
])
def test_an_option_without_its_mode_is_an_error(data, tmp_path, options, message):
    for action in (["build", str(data), "--model", "d3m/tiny-mnist", "--teacher", "tiny_teacher:build_teacher"],
                   ["merge", str(tmp_path)]):
        result = CliRunner().invoke(main, [*action, "-o", str(tmp_path / "x.d3m"), *options])
        assert result.exit_code == 1 and message in result.stderr, result.output
    hard = CliRunner().invoke(main, [str(data), "-o", str(tmp_path / "x.d3m"), "--model", "d3m/tiny-mnist",
                                     "--teacher", "tiny_teacher:build_teacher", "--label-kind", "hard",
                                     "--temperature", "2"])  # a temperature does not change a hard label
    assert hard.exit_code == 1 and "drop --k, --values and --temperature" in hard.stderr
    assert not list(tmp_path.iterdir())


def test_class_list_files_empty_non_utf8_and_spaces(tmp_path):

    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(D3MError, match="lists no classes"):
        read_class_list(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(D3MError, match="is not UTF-8 text"):
        read_class_list(tmp_path / "latin1.txt")
    (tmp_path / "tabs.txt").write_text("my folder\tMy Name\nplain other name\n")
    assert read_class_list(tmp_path / "tabs.txt") == (["my folder", "plain"], ["My Name", "other name"])


def test_a_shard_records_classes_below_min_agreement_and_goes_on(tiny_model, data, tmp_path, caplog):
    args = [str(data), "-o", str(tmp_path / "s.d3m"), *tiny_args(tiny_model), "--shard", "0/3", "--min-agreement", "1"]
    first = CliRunner().invoke(main, args)
    # the early check: a few renders of the class name, before its inversion, already warn
    assert "class a_red: before inversion, the teacher takes 0% of the patches of 2 renders" in caplog.text
    second = CliRunner().invoke(main, args)  # resumed: the recorded class is reported again, not skipped
    for result in (first, second):
        assert result.exit_code == 0, result.output
        assert "1 of this shard's 1 classes are below --min-agreement 1: 'a_red' 0% (real 100%)" in result.stderr
        assert "the merge with --min-agreement will refuse them" in result.stderr
        assert "--min-agreement 1" in result.stderr.split("d3m-build merge")[1]  # the merge command keeps it
    assert (tmp_path / "s.d3m.work" / "classes" / "000000.safetensors").is_file() and not (tmp_path / "s.d3m").exists()
    ok = CliRunner().invoke(main, [*args[:-2], "--labels", "topk", "--k", "2"])
    assert ok.exit_code == 0, ok.output
    assert "d3m-build merge" in ok.stderr and "--label-kind topk --k 2 --values u8sqrt" in ok.stderr
    assert "below --min-agreement" not in ok.stderr


def test_a_single_run_enforces_min_agreement_once_at_the_end(tiny_build, tiny_model, image_folder, tmp_path):
    """Every class is built (here: resumed from the shared build), then the archive is refused, naming them."""
    from conftest import tiny_build_args

    regen = {c: Workdir(tiny_build.workdir, create=False).load_class(i)[1]["regenerated"]
             for i, c in enumerate(("a_red", "b_green", "c_blue"))}
    wd = shutil.copytree(tiny_build.workdir, tmp_path / "wd")
    out = tmp_path / "tiny.d3m"  # the shared build's name: the same archive once accepted
    result = CliRunner().invoke(main, [str(image_folder), "-o", str(out), *tiny_build_args(tiny_model),
                                       "--workdir", str(wd), "--min-agreement", "1"])
    assert result.exit_code == 1 and not out.exists()
    message = result.stderr.strip().splitlines()[-1]
    below = [c for c, r in regen.items() if r < 1]
    assert below and below[0] == "a_red", regen  # the premise: some class renders below 100% for the teacher
    assert f"below --min-agreement 1 for {len(below)} of 3 classes: 'a_red' {100 * regen['a_red']:.0f}%" in message
    assert f"every class stays finished in {wd}" in message and f"`d3m-build merge {wd} -o OUT`" in message
    accepted = CliRunner().invoke(main, ["merge", str(wd), "-o", str(out)])
    assert accepted.exit_code == 0 and out.read_bytes() == tiny_build.out.read_bytes()


def test_empty_preview_selection_is_an_error(tmp_path):
    from d3mfmt.cli import inspect_main

    golden = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "topk.d3m"
    result = CliRunner().invoke(inspect_main, ["preview", str(golden), "-o", str(tmp_path / "p.png"),
                                               "--select", ","])
    assert result.exit_code == 1 and "names no class" in result.stderr and not (tmp_path / "p.png").exists()
