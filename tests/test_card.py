"""Dataset cards: front matter the Hub parses, a body that survives hostile manifest strings,
and a loading snippet that runs against the archive it describes."""

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import copy_cache, make_archive, with_manifest
from PIL import Image
from test_sources import place_in_hf_cache

import d3mfmt
from d3mfmt import ClassInfo, D3MError, ModelRef, RenderOptions, SourceInfo
from d3mfmt.card import (
    CARD_PREVIEW_CLASSES,
    build_rows,
    card_text,
    hub_license,
    md_code,
    md_escape,
    size_category,
    write_card,
)

ROOT = Path(__file__).resolve().parent.parent
TOPK = ROOT / "spec" / "vectors" / "topk.d3m"
HOSTILE = [
    "pipe | in a cell",
    "line\n---\nlicense: mit\n---",
    "<script>alert(1)</script>",
    "```python\nimport os\n```",
    "*bold* [link](https://evil.example) `code` # heading",
]


@pytest.fixture(autouse=True)
def d3m_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(tmp_path / "d3m-cache"))
    return tmp_path / "d3m-cache"


def python_block(text: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)\n```$", text, flags=re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]


def card_for(archive, name="x.d3m", repo_id=None) -> str:
    return card_text(d3mfmt.save(archive), name, repo_id=repo_id)


def test_hostile_manifest_strings_stay_inert():
    from huggingface_hub import DatasetCard

    base = make_archive(num_classes=len(HOSTILE))
    ds = replace(base.manifest.dataset, name="evil\n---\ntags: [x]\n| name",
                 classes=tuple(ClassInfo(f"id{i}|`", n) for i, n in enumerate(HOSTILE)),
                 source=SourceInfo("src <b>", None, "My Licence v2!"))
    build = {"tool": "d3mfmt 0.1.0", "command": "d3m-build | rm -rf /", "nested": {"deep": {"ok": True, "none": None}},
             "per_class_agreement": [0.5 + i / 2000 for i in range(1000)], "small": [1, 2.5, "a|b"],
             "stats": [{"loss": 0.25}, {"loss": 0.125}]}
    gen = replace(base.manifest.generator, model=ModelRef("evil/```sh\nrm", "v1; rm -rf ~", None))
    archive = replace(base, manifest=replace(base.manifest, dataset=ds, generator=gen, build=build))
    text = card_for(archive)
    card = DatasetCard(text)
    # 1. the front matter: parsed by the Hub's own code, hostile text kept to one line of one key
    assert card.data.license == "other" and card.data.license_name == "my-licence-v2"
    assert card.data.pretty_name == "evil --- tags: [x] | name"
    assert card.data.tags == ["dataset-distillation", "d3m", "synthetic"]
    assert card.data.task_categories == ["image-classification"] and card.data.size_categories == ["n<1K"]
    # 2. the class table: one row per class, every pipe inside a cell escaped
    rows = [line for line in card.text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == len(HOSTILE)
    for row, name in zip(rows, HOSTILE):
        assert len(re.findall(r"(?<!\\)\|", row)) == 4, row
    assert "<script>" not in card.text and "\\<script\\>" in card.text
    assert "[link](https" not in card.text and "\\[link\\](https" in card.text
    # 3. no fence a class name could open: only the card's own python and bash blocks
    assert re.findall(r"^`{3,}(\w*)$", card.text, flags=re.M) == ["python", "", "bash", ""]
    assert "local folder (````evil/```sh rm````)" in card.text
    # 4. build info rendered generically
    assert "| per\\_class\\_agreement | 1000 values: min 0.5, mean 0.74975, max 0.9995 |" in card.text
    assert "| nested.deep.ok | true |" in card.text and "| stats\\[1\\].loss | 0.125 |" in card.text
    assert "d3m-build \\| rm -rf /" in card.text


def test_unpaired_surrogate_in_a_manifest_is_a_format_error():
    # valid JSON, but no UTF-8 step after the reader (content hash, card, summary) could encode it
    data = with_manifest(d3mfmt.save(make_archive()), lambda d: d["build"].update(note="lone \ud800"))
    with pytest.raises(d3mfmt.D3MFormatError, match=r"build.note contains the unpaired surrogate"):
        d3mfmt.load(data)
    with pytest.raises(d3mfmt.D3MFormatError, match="unpaired surrogate"):
        card_text(data, "x.d3m")


def test_what_a_user_needs_follows_the_model_and_the_repo():
    base = make_archive()
    local = replace(base, manifest=replace(base.manifest, generator=replace(
        base.manifest.generator, model=ModelRef("/home/me/sd15", None, "sha256:" + "ab" * 32))))
    text = card_for(local, "x.d3m", repo_id="me/x")
    assert "local folder (`/home/me/sd15`)" in text and "model=FOLDER" in text and "huggingface-cli" not in text
    assert "d3m-inspect verify hf://datasets/me/x/x.d3m --allow-download" in text
    assert "render=RenderOptions(model=FOLDER)" in text
    builtin = d3mfmt.load_file(Path(__file__).parent.parent / "spec" / "vectors" / "onehot.d3m")  # d3m/tiny-mnist
    assert "ships inside d3mfmt" in card_for(builtin)
    hub = replace(base, manifest=replace(base.manifest, generator=replace(
        base.manifest.generator, model=ModelRef("org/sd", "v1; rm -rf ~", None))))
    assert re.search(r"^```bash\nhuggingface-cli download org/sd --revision 'v1; rm -rf ~'\n```$", card_for(hub), re.M)
    assert "d3m-inspect verify" in card_for(base)
    assert builtin.fingerprints is None and "d3m-inspect verify" not in card_for(builtin)  # no fingerprints: nothing to verify


def test_build_rows_and_front_matter_helpers():
    assert build_rows({}) == []
    rows = dict(build_rows({"a": {"b": [1, 2]}, "c": 0.123456789, "d": list(range(20)), "e": [[1], [2]]}))
    assert rows == {"a.b": "[1, 2]", "c": "0.123457", "d": "20 values: min 0, mean 9.5, max 19",
                    "e[0]": "[1]", "e[1]": "[2]"}
    assert [md_escape(t) for t in ("- x", "1. x", "# x", "0.5", "a_b|c")] == ["\\- x", "1\\. x", "\\# x", "0.5",
                                                                              "a\\_b\\|c"]
    assert md_code("a``b") == "```a``b```" and md_code("`x") == "`` `x ``"
    assert hub_license("CC-BY-SA-3.0") == {"license": "cc-by-sa-3.0"}
    assert hub_license(None) == {"license": "unknown"}
    assert [size_category(n) for n in (80, 1000, 40_000, 10**10)] == ["n<1K", "1K<n<10K", "10K<n<100K", "n>1B"]


def test_card_folder_parses_and_its_snippet_trains(tmp_path, hf_cache, monkeypatch, d3m_cache, topk_cache):
    from huggingface_hub import DatasetCard

    copy_cache(topk_cache, d3m_cache / "images")  # the default cache_dir: rendered once per session
    out = write_card(TOPK, tmp_path / "card")
    # 1. the folder: the archive as it was, the preview, the README
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "preview.png", "topk.d3m"]
    assert (out / "topk.d3m").read_bytes() == TOPK.read_bytes()
    with Image.open(out / "preview.png") as preview:
        assert preview.height == min(CARD_PREVIEW_CLASSES, 10) * (128 + 4)
    card = DatasetCard.load(out / "README.md")
    a = d3mfmt.load_file(TOPK)
    assert card.data.license == "cc-by-sa-3.0" and card.data.pretty_name == "golden-topk"
    assert card.data.size_categories == ["n<1K"] and card.data.viewer is False
    for text in [a.content_hash, hashlib.sha256(TOPK.read_bytes()).hexdigest(), "`d3m/tiny-mnist`",
                 a.manifest.generator.model.identity, "held-out accuracy **0.9900**", "| 7 | 7 | seven |",
                 "encoding `topk`, k = 3", f"{TOPK.stat().st_size:,} bytes", "![preview](preview.png)"]:
        assert text in card.text, text
    # 2. the loading snippet, run as written from the card folder: one batch of patches and soft labels
    monkeypatch.chdir(out)
    namespace = {}
    exec(python_block(card.text), namespace)
    images, labels, classes = next(iter(namespace["loader"]))
    assert images.shape == (64, 3, 32, 32) and labels.shape == (64, 10) and classes.shape == (64,)
    assert float(labels.sum(1).min()) > 0.99
    # 3. with a repo id the snippet loads by hf:// id (here from a Hugging Face cache laid out by the test)
    place_in_hf_cache(hf_cache, "me/topk-d3m", "topk.d3m", TOPK.read_bytes())
    snippet = python_block(card_for(a, "topk.d3m", repo_id="me/topk-d3m"))
    assert "hf://datasets/me/topk-d3m/topk.d3m" in snippet and "render=RenderOptions(allow_download=True)" in snippet
    namespace = {}
    exec(snippet, namespace)
    assert next(iter(namespace["loader"]))[0].shape == (64, 3, 32, 32)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_card_is_all_or_nothing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(D3MError, match="not an empty folder"):
        write_card(TOPK, tmp_path / "full")
    with pytest.raises(D3MError, match="repo_id must look like"):
        write_card(TOPK, tmp_path / "card", repo_id="no slash")
    # a failure while rendering the preview leaves neither the card nor its temporary folder
    broken = RenderOptions(model=str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(D3MError, match="no-such-model"):
        write_card(TOPK, tmp_path / "new" / "card", render=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # the parent it made went too
