"""The results as documented are exactly what the committed results/ hold: docs/results.md's
tables match the results/ CSVs, README.md names the provenance commit and command, and every
results/ PNG that README.md or docs/*.md links to exists."""

from __future__ import annotations

import json
import re

import pytest

from brainhpc.sweep.aggregate import report
from brainhpc.sweep.resources import REPO

RESULTS = REPO / "results"
README = REPO / "README.md"
DOCS = REPO / "docs"
TABLES = DOCS / "results.md"
START, END = "<!-- results:tables:start -->", "<!-- results:tables:end -->"
# a Markdown link target ending in .png that goes through results/: results/x.png from
# README.md, ../results/x.png from docs/
PNG = re.compile(r"\(((?:\.\./)*results/[^)\s]+\.png)\)")


@pytest.mark.skipif(not (RESULTS / "metrics.csv").exists(),
                    reason="no committed results/ yet (the study has not been published)")
def test_readme_tables_match_results_csv():
    tables = TABLES.read_text()
    assert START in tables and END in tables, "docs/results.md lacks the results table markers"
    shown = tables.split(START, 1)[1].split(END, 1)[0].strip()
    assert shown == report(RESULTS).strip(), (
        "docs/results.md tables differ from results/*.csv: paste `python -m brainhpc.sweep "
        "report results` between the markers")
    readme = README.read_text()
    prov = json.loads((RESULTS / "provenance.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]) and prov["command"]
    assert prov["commit"] in readme and prov["command"] in readme
    pages = [README, *sorted(DOCS.glob("*.md"))]
    links = 0
    for page in pages:
        for png in PNG.findall(page.read_text()):
            links += 1
            target = (page.parent / png).resolve()
            assert target.is_file(), f"{page.relative_to(REPO)}: {png} does not exist"
            assert target.is_relative_to(RESULTS.resolve()), f"{page.relative_to(REPO)}: {png}"
    assert links, "no results/ PNG linked from README.md or docs/"


R128 = RESULTS / "128px"
INTERVAL = re.compile(r"-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]")


@pytest.mark.skipif(not (RESULTS / "intervals.csv").exists(), reason="no committed results/")
def test_every_interval_the_readme_quotes_is_in_the_results():
    """Every "value [lo, hi]" README.md's Results section quotes ("84.6 [81.1, 87.6]") is one of
    the reports of results/ or results/128px, so no number there is typed by hand."""
    reports = report(RESULTS) + (report(R128) if (R128 / "intervals.csv").exists() else "")
    results = README.read_text().split("## Results", 1)[1]
    quoted = INTERVAL.findall(results)
    assert len(quoted) >= 10
    for q in quoted:
        assert q.replace("+", "") in reports.replace("+", ""), f"README quotes {q}, not in results/"


@pytest.mark.skipif(not (R128 / "intervals.csv").exists(), reason="no committed results/128px")
def test_the_128px_tables_match_their_csvs():
    tables = TABLES.read_text()
    start, end = "<!-- results-128px:tables:start -->", "<!-- results-128px:tables:end -->"
    shown = tables.split(start, 1)[1].split(end, 1)[0].strip()
    assert shown == report(R128).strip(), "paste `python -m brainhpc.sweep report " \
        "results/128px` between the results-128px markers of docs/results.md"
