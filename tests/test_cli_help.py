"""``crossspec ... --help`` imports no heavy module and shows every default (issue 13).

Each command's help runs in a fresh interpreter, so modules this test process already imported
(torch through conftest) do not hide an import the parser makes. No wall times are asserted: the
module list is what makes help slow, and it does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossspec_kernels import cli, generate_cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "safetensors", "h5py", "hdf5plugin", "numpy", "triton", "av")
# Commands the parser must offer; discovery below may find more, never fewer.
KNOWN_COMMANDS = {
    (),
    ("demo",),
    ("generate",),
    ("info",),
    ("adapter",),
    ("adapter", "extract"),
    ("adapter", "train"),
    ("adapter", "eval"),
}

# Runs `crossspec <argv>` in-process through cli.main and reports the exit status, the help text
# and the heavy modules loaded by then, as one JSON line.
HELP_SCRIPT = f"""
import contextlib, io, json, sys
from crossspec_kernels.cli import main
help_text = io.StringIO()
with contextlib.redirect_stdout(help_text):
    try:
        main(sys.argv[1:])
        status = "returned without exiting"
    except SystemExit as exit:
        status = exit.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {sorted(HEAVY)!r})
print(json.dumps({{"status": status, "help": help_text.getvalue(), "heavy": heavy}}))
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: child
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, child in action.choices.items()
    }


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) below ``parser``, the root included, nested ones like adapter train."""
    found = [(path, parser)]
    for name, child in _subparsers(parser).items():
        found += _commands(child, (*path, name))
    return found


COMMANDS = _commands(cli.build_parser())


def _shown_defaults(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{option: the "(default: X)" text its help must carry} for options with a default worth showing."""
    return {
        action.option_strings[-1]: f"(default: {action.default})"
        for action in parser._actions
        if action.option_strings
        and action.default not in (None, False, argparse.SUPPRESS)
        and not isinstance(action, argparse._HelpAction)
    }


def _help(argv: tuple[str, ...]) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT, *argv, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_discovery_finds_every_known_command():
    assert not KNOWN_COMMANDS - {path for path, _ in COMMANDS}


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[" ".join(p) or "crossspec" for p, _ in COMMANDS])
def test_help_imports_nothing_heavy_and_shows_defaults(path, parser):
    result = _help(path)
    assert result["status"] == 0
    packages = sorted({module.split(".")[0] for module in result["heavy"]})
    assert not result["heavy"], (
        f"`crossspec {' '.join(path)} --help` imported {packages} ({len(result['heavy'])} modules)"
    )
    text = " ".join(result["help"].split())  # undo argparse's line wrapping
    assert text.startswith(f"usage: {parser.prog}")
    assert "exit status:" in text  # the shared formatter and epilog (cli_common.add_command)
    missing = {option: shown for option, shown in _shown_defaults(parser).items() if shown not in text}
    assert not missing, f"`crossspec {' '.join(path)} --help` does not show {missing}"


def test_defaults_are_checked_where_commands_have_options():
    """The default check above must not pass by finding no defaults: these commands have some."""
    with_defaults = {" ".join(path) for path, parser in COMMANDS if _shown_defaults(parser)}
    assert not {"demo", "generate", "adapter extract", "adapter train", "adapter eval"} - with_defaults


def test_generate_dtype_names_are_torch_dtypes():
    # generate_cli spells the --dtype choices out so that its parser needs no torch.
    import torch

    for name in generate_cli.DTYPE_NAMES:
        assert isinstance(getattr(torch, name), torch.dtype), name
