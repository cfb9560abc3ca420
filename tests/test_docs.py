"""The documentation matches the code: docs/cli.md covers every flag, key and recipe, the
README's commands are the ones CI runs, and the README's Python example runs."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cvsparse import cli
from cvsparse.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"
README = ROOT / "README.md"
TEST_COMMAND = "python -m pytest tests -q -n 2"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _flag_keys(dest: str) -> set[str]:
    """Every configuration key the flag ``dest`` may set (any method)."""
    keys = {cli._FLAGS[dest]} if dest in cli._FLAGS else set()
    for flags in cli._METHOD_FLAGS.values():
        if dest in flags:
            keys.add(flags[dest])
    return keys


def _value(path: str):
    target = RunConfig()
    for part in path.split("."):
        target = getattr(target, part)
    return target


def _leaf_keys(obj, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _flag_rows() -> dict[str, list[str]]:
    """``--flag`` → its table row's cells (flag, key, default, meaning) in docs/cli.md."""
    rows = {}
    for line in CLI_DOC.read_text().splitlines():
        if line.startswith("| `--"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            for flag in re.findall(r"`(--[a-z0-9-]+)", cells[0]):
                assert flag not in rows, f"{flag} has two rows in docs/cli.md"
                rows[flag] = cells
    return rows


def _literal(text: str):
    """A backticked default as a value (``1e-4`` is a float, as the config reads it)."""
    try:
        return float(text) if re.fullmatch(r"[-+0-9.eE]+", text) else yaml.safe_load(text)
    except ValueError:
        return text


def _fenced_blocks(text: str, language: str | None = None) -> list[list[str]]:
    blocks, current, lang = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if language is None or lang == language:
                    blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


# ---- docs/cli.md --------------------------------------------------------------------------

def test_every_subcommand_and_argument_is_documented():
    doc = CLI_DOC.read_text()
    for name, parser in _subcommands().items():
        assert f"`cvsparse {name}" in doc, f"command {name!r} missing from docs/cli.md"
        for action in _actions(parser):
            if action.option_strings:
                for flag in action.option_strings:
                    assert f"`{flag}" in doc, f"{name} {flag} missing from docs/cli.md"
            else:
                assert f"`{action.dest}`" in doc, f"{name} argument {action.dest} missing"


def test_every_train_flag_has_one_table_row():
    rows = _flag_rows()
    flags = {f for a in _actions(_subcommands()["train"]) for f in a.option_strings}
    assert set(rows) == flags, (f"no row: {sorted(flags - set(rows))}; "
                                f"no such flag: {sorted(set(rows) - flags)}")


def test_documented_flags_exist():
    doc = CLI_DOC.read_text()
    known = {f for p in _subcommands().values() for a in p._actions for f in a.option_strings}
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc))
    assert mentioned <= known, f"docs/cli.md names unknown flags {sorted(mentioned - known)}"


def test_flag_rows_name_the_keys_the_flags_set():
    by_flag = {f: a.dest for a in _actions(_subcommands()["train"]) for f in a.option_strings}
    for flag, cells in _flag_rows().items():
        documented = set(re.findall(r"`([a-z_0-9]+(?:\.[a-z_0-9]+)?)`", cells[1]))
        assert documented == _flag_keys(by_flag[flag]), f"{flag}: key column {cells[1]!r}"


def test_flag_rows_state_the_defaults():
    by_flag = {f: a.dest for a in _actions(_subcommands()["train"]) for f in a.option_strings}
    for flag, cells in _flag_rows().items():
        stated = [_literal(t) for t in re.findall(r"`([^`]+)`", cells[2])]
        defaults = [_value(k) for k in sorted(_flag_keys(by_flag[flag]))]
        for default in defaults:
            if default is None:
                assert "none" in cells[2], f"{flag}: default column {cells[2]!r} lacks 'none'"
            else:
                assert default in stated, f"{flag}: default {default!r} not in {cells[2]!r}"


def test_every_config_key_is_documented():
    doc = CLI_DOC.read_text()
    missing = [k for k in _leaf_keys(RunConfig()) if f"`{k}`" not in doc]
    assert not missing, f"config keys missing from docs/cli.md: {missing}"


def test_every_recipe_is_listed():
    shipped = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    listed = set(re.findall(r"configs/[\w.-]+\.yaml", CLI_DOC.read_text()))
    assert shipped == listed, (f"unlisted: {sorted(shipped - listed)}; "
                               f"gone: {sorted(listed - shipped)}")


# ---- README -------------------------------------------------------------------------------

def test_readme_first_block_is_install_and_run_then_the_tests():
    first = _fenced_blocks(README.read_text())[0]
    assert len(first) == 2, first
    assert first[1] == TEST_COMMAND
    assert "pip install -r requirements-dev.txt" in first[0]
    assert "pip install --no-build-isolation -e ." in first[0]
    assert "cvsparse train " in first[0]


def test_ci_installs_what_the_readme_says():
    first_line = _fenced_blocks(README.read_text())[0][0]
    readme_installs = [c.strip() for c in first_line.split("&&") if "pip install" in c]
    ci_installs = [line.replace(" -q", "").strip()
                   for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.startswith("pip install")]
    assert readme_installs == ci_installs


def test_torch_is_pinned_in_the_requirements():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert any(re.fullmatch(r"torch==[\d.]+", line.strip()) for line in lines)
    assert any(re.fullmatch(r"torchvision==[\d.]+", line.strip()) for line in lines)


@pytest.mark.parametrize("path", [README, CLI_DOC], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{path.name} links to missing files: {missing}"


@pytest.mark.parametrize("path", [README, CLI_DOC], ids=lambda p: p.name)
def test_no_paths_of_a_particular_machine(path):
    text = path.read_text()
    for fragment in ("/work/", "/root/", "/home/", "/tmp/"):
        assert fragment not in text, f"{path.name} mentions {fragment}"


@pytest.mark.parametrize("index", [0, 1], ids=["compress", "pieces"])
def test_readme_python_examples_run(tmp_path, index):
    blocks = _fenced_blocks(README.read_text(), "python")
    assert len(blocks) == 2, "the README has two python blocks (compress, the pieces)"
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks[index])], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights kept" in result.stdout
