"""The README's Python snippets run as written (from the repository root)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_snippets_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("D3MFMT_CACHE_DIR", str(tmp_path))  # rendered images go here, not to ~/.cache
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "10 2 2 (10, 1, 64)" in out
    assert "80 (16, 3, 32, 32) (16, 10)" in out  # the DataLoader snippet ran on regenerated patches
    assert list(tmp_path.rglob("*.npy"))
    assert "truncated" in out or "not a .d3m" in out
