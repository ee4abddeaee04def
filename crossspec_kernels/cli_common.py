"""What every ``crossspec`` command shares: exit codes, the help formatter, user errors, cheap checks.

Standard library only: ``crossspec ... --help`` imports this module and the commands' parsers, never
torch, transformers or the models, so help answers at once. The checks here run before any model
loads, and their messages name the flag.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

EXIT_OK = 0
EXIT_OUTPUTS_DIFFER = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3

EXIT_CODES_HELP = """exit status:
  0  success
  1  outputs differ (demo: the engine's tokens are not target.generate's)
  2  usage error: a bad flag or input file, one line on stderr, before any model is loaded
  3  runtime error: a failure after the inputs were accepted (traceback on stderr)"""


class UsageError(SystemExit):
    """A user error: ``str(error)`` is the one-line message, the exit status is 2 (EXIT_USAGE)."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USAGE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each option's default to its help (ArgumentDefaultsHelpFormatter without its
    "(default: None)" and "(default: False)" noise) and keeps descriptions' and epilogs' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default is not None and default is not False and default is not argparse.SUPPRESS
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def add_command(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """``subparsers.add_parser`` with the shared formatter and the exit codes in the epilog."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    kwargs.setdefault("epilog", EXIT_CODES_HELP)
    return subparsers.add_parser(name, **kwargs)


def existing_file(path: str, flag: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise UsageError(f"{flag} {path!r} does not exist")
    if not file.is_file():
        raise UsageError(f"{flag} {path!r} is not a file")
    return file


def existing_dir(path: str, flag: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise UsageError(f"{flag} folder {path!r} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path!r} is not a folder")
    return folder


def output_file(path: str, flag: str) -> Path:
    """A file to write at the end of a run: its folder must exist now, not after minutes of work."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(f"{flag} {path!r} is a folder; give a file name")
    if not file.resolve().parent.is_dir():
        raise UsageError(f"{flag} {path!r}: folder {str(file.resolve().parent)!r} does not exist")
    return file


# argparse types: argparse prefixes their messages with "argument --flag:", so they name the flag.


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"  # argparse names the type in "invalid <type> value" messages
    return parse


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """A finite float in [low, high] (``low_open``/``high_open`` exclude the ends)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be a finite float in {interval}, got {text!r}")
        return value

    parse.__name__ = f"float in {interval}"
    return parse
