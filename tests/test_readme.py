"""The README's Python snippets run as written (from the repository root)."""

import re
from pathlib import Path

from conftest import copy_cache

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_snippets_run(monkeypatch, capsys, tmp_path, topk_cache):
    from d3mfmt.generator import Regenerator, default_device

    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(tmp_path))  # rendered images are looked up here, not in ~/.cache
    copy_cache(topk_cache, tmp_path / "images")  # topk.d3m's images, rendered once per session
    cached = sorted(tmp_path.rglob("*.npy"))

    def no_rendering(self, pairs):
        raise AssertionError("a README snippet rendered instead of reading D3MFMT_CACHE_DIR")

    on_cpu = default_device() == "cpu"  # the snippets' default device: the session cache holds CPU pixels
    if on_cpu:
        monkeypatch.setattr(Regenerator, "render_pairs", no_rendering)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "10 2 2 (10, 1, 64)" in out
    assert "80 (16, 3, 32, 32) (16, 10)" in out  # the DataLoader snippet ran on regenerated patches
    assert "(3, 64, 64) (4, 10) True" in out  # unit="image" under RenderOptions; image_cache_dir lies under cache_dir
    assert len(cached) == 20 and (sorted(tmp_path.rglob("*.npy")) == cached if on_cpu else
                                  len(list(tmp_path.rglob("*.npy"))) > 20)
    assert "truncated" in out or "not a .d3m" in out
