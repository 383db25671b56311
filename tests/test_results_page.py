"""benchmarks/README.md, the results page: every raw output it cites exists, and no page of the
project dates its work by the ordinal of a work period instead of a date or commit."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PAGE = ROOT / "benchmarks" / "README.md"
ORDINAL_SESSION = re.compile(r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|"
                             r"eleventh|twelfth|this|that|same|last|next|previous)\s+session", re.I)


def test_every_cited_results_file_exists():
    cited = set(re.findall(r"results/[\w.\-*]+", PAGE.read_text()))
    assert cited, "the results page cites no raw output"
    missing = [ref for ref in sorted(cited) if not list((ROOT / "benchmarks").glob(ref))]
    assert missing == []


def test_no_session_ordinals_in_docs_and_results():
    pages = [ROOT / "README.md", PAGE, *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "benchmarks" / "results").glob("*.txt")), *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in pages for i, line in enumerate(p.read_text().splitlines(), 1)
            if ORDINAL_SESSION.search(line)]
    assert hits == []
    named = [p.name for p in (ROOT / "benchmarks" / "results").iterdir()
             if re.search(r"-(third|fourth|fifth|sixth|seventh|eighth|ninth|tenth)\b", p.stem)]
    assert named == []
