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


# -- every command and option the docs show exists -----------------------------------------------

DOCS = ("README.md", "docs/results.md", "docs/sharing.md")
OTHER_TOOLS = {"--no-deps", "--repo-type", "--nproc-per-node"}  # pip, hf, torchrun options the docs use
REFUSED = {"--check"}  # an old d3m-inspect spelling the README names as an error
OPTION = re.compile(r"--[a-z0-9][a-z0-9-]*")


def _click_options(command) -> set[str]:
    return {"--help"} | {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}


def _script_options(path: Path) -> set[str]:
    """The options an argparse example script declares, read from its source: the add_argument calls, and
    one option per field of its ``Config`` dataclass where it adds those in a loop."""
    import ast

    source = path.read_text()
    calls = re.findall(r"add_argument\(([^)]*)\)", source)
    options = {"--help"} | {opt for call in calls for opt in re.findall(r"[\"'](--[a-z0-9-]+)[\"']", call)}
    if '"--" + field.name.replace("_", "-")' in source:
        config = next(node for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.ClassDef) and node.name == "Config")
        options |= {"--" + s.target.id.replace("_", "-") for s in config.body if isinstance(s, ast.AnnAssign)}
    return options


def _programs() -> dict:
    """Program name -> (click group and its default subcommand, or a script's option set)."""
    from builder.cli import main as build_main
    from d3mfmt.cli import inspect_main

    programs = {"d3m-build": (build_main, "build"), "builder.cli": (build_main, "build"),
                "d3m-inspect": (inspect_main, "summary")}
    for script in sorted((ROOT / "examples").glob("*.py")):
        programs[f"examples/{script.name}"] = _script_options(script)
    return programs


def _command_snippets(text: str) -> list[str]:
    """Shell lines of the fenced blocks (not Python, continuations joined) and the inline code spans."""
    fenced = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
    lines = [line for lang, body in fenced if lang not in ("python", "py")
             for line in body.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def _invocations(snippet: str, programs: dict):
    """(program, tokens after it up to a comment) for each program a snippet runs."""
    words = [w.strip("[]()") for w in snippet.split()]
    for k, word in enumerate(words):
        if word in programs:
            tail = []
            for w in words[k + 1:]:
                if w.startswith("#") or w in programs:
                    break
                tail.append(w)
            yield word, tail


def _resolve(group, default: str, tokens: list[str]):
    """The click command ``tokens`` run, as the CLI resolves it (a default subcommand where none is named)."""
    command = group
    for token in tokens:
        if token.startswith("-"):
            break
        if token not in getattr(command, "commands", {}):
            break
        command = command.commands[token]
    if hasattr(command, "commands"):
        command = command.commands[default] if command is group else command
    return command


def test_docs_commands_use_only_options_their_command_has():
    import click
    from click.testing import CliRunner
    from d3mfmt.cli import inspect_main

    programs = _programs()
    checked = 0
    for doc in DOCS:
        for snippet in _command_snippets((ROOT / doc).read_text()):
            for program, tokens in _invocations(snippet, programs):
                target = programs[program]
                if isinstance(target, set):
                    known, name = target, program
                else:
                    command = _resolve(*target, tokens)
                    assert not isinstance(command, click.Group), (doc, snippet)
                    known, name = _click_options(command), f"{program} {command.name}"
                used = {m.group() for t in tokens if (m := OPTION.match(t))}
                unknown = used - known - REFUSED
                assert not unknown, f"{doc}: `{snippet.strip()}`: {name} has no {sorted(unknown)}"
                checked += len(used)
    assert checked > 50  # the demo, both CLIs' tables, the recipes
    # the refused spelling really is refused, with the subcommand to use
    refused = CliRunner().invoke(inspect_main, ["spec/vectors/topk.d3m", *REFUSED])
    assert refused.exit_code == 2 and "d3m-inspect check FILE" in refused.output


def test_every_option_the_docs_name_exists():
    programs = _programs()
    known = set(OTHER_TOOLS) | REFUSED
    for target in programs.values():
        if isinstance(target, set):
            known |= target
        else:
            stack = [target[0]]
            while stack:
                command = stack.pop()
                known |= _click_options(command)
                stack.extend(getattr(command, "commands", {}).values())
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        named = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text)) - {"--"}
        assert named and named <= known, f"{doc}: no command takes {sorted(named - known)}"


def test_ci_runs_exactly_the_readme_test_command():
    two_commands = re.search(r"## Two commands\n\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    readme_commands = [line.split("#")[0].strip() for line in two_commands.group(1).splitlines()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert readme_commands == ["make demo", "make test"] and ci == ["make test"]


def test_readme_summary_is_what_d3m_inspect_prints():
    from click.testing import CliRunner
    from d3mfmt.cli import inspect_main

    shown = re.search(r"```text\n\$ d3m-inspect (\S+)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    result = CliRunner().invoke(inspect_main, [str(ROOT / shown.group(1))])
    assert result.exit_code == 0 and result.stdout == shown.group(2)
