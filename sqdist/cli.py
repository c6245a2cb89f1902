"""What the command lines (``python -m sqdist.train|export|compress|ptq``) share: an argument parser
whose errors are one line, and the one-line report of an error the user can fix (exit code 2)."""
from __future__ import annotations

import argparse
import os
import sys

from .config import RecipeError
from .files import one_line


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on rank 0 and exit 2 (argparse prints the usage
    too); its ``prog`` is the command, e.g. ``python -m sqdist.compress``."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":
            name = self.prog.split()[-1]
            print(f"{name}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def report_error(name: str, exc: Exception) -> int:
    """Print ``exc`` as one line on rank 0 (``name: error: ...``, a recipe error said so); the exit code, 2."""
    if os.environ.get("RANK", "0") == "0":
        prefix = "recipe error: " if isinstance(exc, RecipeError) else ""
        print(f"{name}: error: {prefix}{one_line(exc)}", file=sys.stderr)
    return 2
