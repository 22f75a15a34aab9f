"""The project's files speak of the project: they cite its own specification (docs/algorithms.md) and say what
the code does and why, never a document outside the repository or how a change was requested."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["samkit", "tests", "docs", "benchmarks", "examples", ".ci"]
SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ""}
# Each pattern names a text outside the project or the request behind a change (the words are split so that
# this file does not match itself).
OUTSIDE = [
    r"(?<!docs/)\bALGORITHMS" r"\.md\b",
    r"\b[Tt]he iss" r"ue('s)?\b",
    r"\b[Tt]he le" r"ad\b(?! time)",
    r"\b[Tt]he bri" r"ef\b",
    r"\bseed sli" r"des\b",
    r"\b[Tt]he seed's (usage )?(snip" r"pet|sli" r"des|code|documents?)\b",
]


def _project_text_files() -> list[Path]:
    files = [p for p in ROOT.glob("*.md")]
    for folder in FOLDERS:
        files += [
            p
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
        ]
    return sorted(files)


def test_the_files_cite_nothing_outside_the_project():
    files = _project_text_files()
    assert len(files) > 50, files  # the scan sees the project
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for pattern in OUTSIDE:
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, (
        "say what the code does and why, and cite docs/algorithms.md for the specification:\n" + "\n".join(found)
    )
