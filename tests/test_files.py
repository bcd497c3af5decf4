"""The shared jobs: safe file names, atomic files and folders, the cache root; the package's public names."""

from pathlib import Path

import pytest

import d3mfmt
from d3mfmt import D3MError
from d3mfmt.agreement import low_agreement
from d3mfmt.files import atomic_folder, cache_root, safe_file_name, write_atomic


@pytest.mark.parametrize("text, kwargs, name", [
    ("mnist_ipc10.d3m", {"default": "archive", "suffix": ".d3m"}, "mnist_ipc10.d3m"),
    ("x", {"default": "archive", "suffix": ".d3m"}, "x.d3m"),  # the suffix is added
    ("..", {"default": "archive", "suffix": ".d3m"}, "archive.d3m"),  # never . or ..
    (".hidden", {"default": "archive"}, "hidden"),
    ("a/b\\c d", {"default": "x"}, "a_b_c_d"),  # no separator survives; runs become one _
    ("évil\x1b[2J", {"default": "x"}, "vil_2J"),
    ("great white shark", {"default": "class", "max_chars": 64}, "great_white_shark"),
    ("n" * 300, {"default": "class", "max_chars": 64}, "n" * 64),
    ("y" * 150 + ".d3m", {"default": "archive", "suffix": ".d3m", "max_chars": 100}, "y" * 100 + ".d3m"),
    ("", {"default": "class"}, "class"),
])
def test_safe_file_name(text, kwargs, name):
    assert safe_file_name(text, **kwargs) == name


def test_the_three_callers_name_files_as_before():
    from d3mfmt.export import class_folder
    from d3mfmt.sources import _url_name

    assert class_folder(7, "great white shark") == "0007_great_white_shark"
    assert class_folder(0, "../") == "0000_class"
    assert _url_name("/files/My%20Archive.D3M") == "My_Archive.D3M.d3m"
    assert _url_name("/") == "archive.d3m"


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    write_atomic(tmp_path / "a.bin", b"one")
    write_atomic(tmp_path / "a.bin", b"two", durable=False)
    assert (tmp_path / "a.bin").read_bytes() == b"two"
    with pytest.raises(D3MError, match="does not exist; create it first"):
        write_atomic(tmp_path / "missing" / "a.bin", b"x")
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "b.bin", "not bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    with atomic_folder(tmp_path / "new" / "deep" / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "new" / "deep" / "out").exists()  # nothing at the destination yet
    assert (tmp_path / "new" / "deep" / "out" / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "gone" / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        raise RuntimeError("boom")
    assert not (tmp_path / "gone").exists()  # the parents it made went too
    (tmp_path / "mine").mkdir()
    with pytest.raises(D3MError, match="cannot write the folder"), atomic_folder(tmp_path / "mine") as tmp:
        raise OSError(28, "No space left on device")
    assert list((tmp_path / "mine").iterdir()) == []  # the user's empty folder stays, empty
    with atomic_folder(tmp_path / "mine") as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["b.txt"]
    with pytest.raises(D3MError, match="not an empty folder"), atomic_folder(tmp_path / "mine"):
        pass
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("D3MFMT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "d3mfmt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "d3mfmt"
    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_low_agreement_rule():
    assert low_agreement(None, 0.49) and not low_agreement(None, 0.5)
    assert low_agreement(0.99, 0.49) and low_agreement(1.0, 0.5) is False
    assert not low_agreement(0.9, 0.6) and low_agreement(None, 0.0)


def test_public_names_are_listed_and_resolve():
    listed = dir(d3mfmt)
    for name in ("D3MDataset", "Regenerator", "RenderOptions", "load_file", "resolve_archive"):
        assert name in listed and name in d3mfmt.__all__
    assert sorted(d3mfmt.__all__) == d3mfmt.__all__
    for name in d3mfmt.__all__:
        assert getattr(d3mfmt, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        d3mfmt.Nope  # noqa: B018
