"""The front door stays true: every command the README and docs show parses with the real CLI parser
(or names a script that exists), the README stays short, and benchmark tables equal their JSON.

Nothing is run: parsing with `clinfed.cli.build_parser` is what catches a renamed option, a job that
no longer exists or a stale synopsis, in milliseconds.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from clinfed.bench.tables import render
from clinfed.cli import UsageError, build_parser, job_name

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
SHELL = {"bash", "sh", "shell", "console"}

#: Jobs and subcommands other branches add (the toolbox and OMOP issues). Until they are in the parser,
#: a documented line that uses one is skipped, by name; once merged, the line is checked like any other.
PENDING_JOBS: set[str] = set()
PENDING_SUBCOMMANDS: set[tuple[str, str]] = set()


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every command in the file's shell-tagged fenced blocks; continuation
    lines (trailing backslash) joined, comments and blank lines dropped."""
    text = path.read_text()
    out = []
    for match in FENCE.finditer(text):
        if match.group(1) not in SHELL:
            continue
        first_line = text[: match.start(2)].count("\n") + 1
        pending = ""
        for offset, raw in enumerate(match.group(2).splitlines()):
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            words = shlex.split(line, comments=True)
            if words:
                out.append((first_line + offset, shlex.join(words)))
    return out


def table_commands(path: Path) -> list[tuple[int, str]]:
    """`clinfed ...` code spans inside Markdown table rows (the README's jobs table)."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("|"):
            out.extend((number, span) for span in re.findall(r"`(clinfed [^`]+)`", line))
    return out


def _pending(words: list[str]) -> str | None:
    """The name of a not-yet-merged job or subcommand this command uses, else None."""
    if len(words) > 2 and words[1] in {"simulate", "export"} and words[2] in PENDING_JOBS:
        try:
            job_name(words[2])
        except Exception:
            return words[2]
    if len(words) > 2 and (words[1], words[2]) in PENDING_SUBCOMMANDS:
        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command").choices[words[1]]
        if words[2] not in next(a for a in sub._actions if getattr(a, "choices", None)).choices:
            return " ".join(words[1:3])
    return None


def check_command(command: str) -> str | None:
    """None if `command` is fine; else why not. Returns "pending: NAME" for a not-yet-merged name."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    head = words[0]
    if head == "export" and all(re.fullmatch(r"[A-Z_]+=\S*", w) for w in words[1:]):
        return None  # a site setting an environment variable its policy names
    if head == "clinfed":
        pending = _pending(words)
        if pending:
            return f"pending: {pending}"
        try:
            build_parser().parse_args(words[1:])
        except (SystemExit, UsageError) as exc:  # clinfed's parser raises UsageError; argparse exits
            return f"`{command}` does not parse ({exc})"
        return None
    if head.startswith("./scripts/") or head.startswith("scripts/"):
        script = ROOT / head
        return None if script.is_file() else f"`{command}`: {head} does not exist"
    if head in {"python", "python3"} and len(words) > 1 and words[1].startswith("scripts/"):
        return None if (ROOT / words[1]).is_file() else f"`{command}`: {words[1]} does not exist"
    return f"`{command}`: not a clinfed command or a script of this repository (use a text block)"


CASES = [
    pytest.param(path, number, command, id=f"{path.name}:{number}")
    for path in [README, *DOCS]
    for number, command in shell_lines(path) + (table_commands(path) if path == README else [])
]


@pytest.mark.parametrize("path,number,command", CASES)
def test_every_documented_command_parses_or_names_a_script(path, number, command, capsys):
    problem = check_command(command)
    capsys.readouterr()  # argparse's usage lines for a failure are noise here; the message says it
    if problem and problem.startswith("pending: "):
        pytest.skip(f"{path.name}:{number} uses {problem[9:]}, not merged yet")
    assert problem is None, f"{path.name}:{number}: {problem}"


def test_the_checker_catches_a_stale_command():
    """The check can fail: an unknown option, an unknown job and a missing script are all caught."""
    assert check_command("clinfed simulate breast_cancer_dp --sites 3") is None
    assert "does not parse" in check_command("clinfed simulate breast_cancer_dp --no-such-option")
    assert "does not parse" in check_command("clinfed simulate no_such_job --sites 3")
    assert "does not exist" in check_command("./scripts/no_such_script.sh")
    assert "not a clinfed command" in check_command("rm -rf /")


def test_readme_is_a_front_door():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual belongs in docs/"
    top = "\n".join(lines[:12])
    assert "./scripts/quickstart.sh" in top and "./scripts/test.sh" in top
    assert "shared/" not in text
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / target).is_file(), f"README links to missing {target}"
    assert len(CASES) > 20  # the extraction found the commands (a broken regex would pass vacuously)


def test_generated_benchmark_tables_equal_their_json():
    """No benchmark number in docs/ is typed by hand: each generated block is its JSON's rendering."""
    found = 0
    for doc in DOCS:
        text = doc.read_text()
        found += text.count("<!-- generated: ")
        assert render(text, ROOT) == text, f"{doc.name}: a table differs from its JSON; run scripts/bench_tables.py"
    assert found >= 2
