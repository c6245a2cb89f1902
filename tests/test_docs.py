"""The documentation: the MkDocs site builds with ``--strict`` (a broken link, a missing page or a
missing included file fails it) without importing torch or sqdist, and README.md stays a short
front page whose links resolve and whose result table is the finished converged leaderboard's, copied exactly.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LEADERBOARD = ROOT / "benchmarks" / "results" / "leaderboard_fashion_mnist_converged.md"
MAX_README_LINES = 200

# mkdocs' own command line, in a child process that then reports which heavy modules the build
# imported: the API reference must come from static analysis (mkdocstrings' allow_inspection: false)
BUILD = """
import json, sys
from mkdocs.__main__ import cli
try:
    cli(["build", "--strict", "--site-dir", sys.argv[1]])  # not --quiet: it hides the warnings strict counts
    code = 0
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "timm", "sqdist") if m in sys.modules)
print("DOCS-BUILD " + json.dumps({"code": code, "imported": heavy}))
"""


@pytest.mark.slow
def test_mkdocs_site_builds_strict_without_importing_torch(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-c", BUILD, str(site)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=600)
    report = [line for line in proc.stdout.splitlines() if line.startswith("DOCS-BUILD ")]
    assert report, f"mkdocs did not run (pip install -e '.[docs]'):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(report[-1].split(" ", 1)[1])
    assert result["code"] in (0, None), f"mkdocs build --strict failed:\n{proc.stderr}"
    assert result["imported"] == [], f"building the docs imported {result['imported']}"
    # the pages the site is for: a results file shown through docs/results, an included plugin
    # README, and the API reference rendered from the source
    leaderboard = (site / "results" / "leaderboard_fashion_mnist" / "index.html").read_text()
    assert "SQ-TWN (paper)" in leaderboard
    assert "golden-stick" in (site / "plugins" / "slb" / "index.html").read_text()
    api = (site / "api" / "sqdist" / "index.html").read_text()
    assert "quantize_model" in api and "SQConfig" in api and "load_quantized" in api


def readme_links() -> list[str]:
    text = README.read_text()
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", target)]


def test_readme_is_short_and_its_links_resolve():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the limit is {MAX_README_LINES}"
    links = readme_links()
    assert any(link.startswith("docs/") for link in links), "README.md links no docs/ page"
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_commands_are_the_ones_ci_and_the_install_run():
    text = README.read_text()
    assert "bash scripts/test.sh" in text
    assert re.search(r"^bash \"?\$root/scripts/test.sh\"?", (ROOT / ".ci" / "run").read_text(), re.M), \
        ".ci/run no longer runs the README's test command"
    first = re.search(r"^bash scripts/install.sh && \.venv/bin/python -m sqdist.train (\S+)$", text, re.M)
    assert first, "README.md lost its install-and-train command"
    assert (ROOT / first.group(1)).is_file()


def markdown_table(text: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The first table whose header row starts with ``header_start``: (header, rows), cells stripped."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            cells = lambda row: [c.strip() for c in row.strip().strip("|").split("|")]  # noqa: E731
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(cells(row))
            return cells(line), rows
    raise AssertionError(f"no table starting {header_start!r}")


def test_readme_result_table_is_copied_from_the_leaderboard():
    header, rows = markdown_table(README.read_text(), "| method |")
    page = LEADERBOARD.read_text()
    assert "partial:" not in page, f"{LEADERBOARD.name} is a partial table: the README shows finished numbers"
    board_header, board_rows = markdown_table(page, "| method |")
    assert 6 <= len(rows) <= 10, f"the README's table has {len(rows)} rows; it should have 6-10"
    board = {row[0]: dict(zip(board_header, row)) for row in board_rows}
    for row in rows:
        assert row[0] in board, f"README row {row[0]!r} is not in {LEADERBOARD.name}"
        for column, value in zip(header, row):
            assert column in board_header, f"README column {column!r} is not in {LEADERBOARD.name}"
            assert value == board[row[0]][column], \
                f"README {row[0]!r} {column!r}: {value!r}, the leaderboard says {board[row[0]][column]!r}"
