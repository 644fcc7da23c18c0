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


CV = RESULTS / "cv-real"
CV_START, CV_END = "<!-- cv-real:tables:start -->", "<!-- cv-real:tables:end -->"
INTERVAL = re.compile(r"-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]")


@pytest.mark.skipif(not (CV / "intervals.csv").exists(), reason="no committed results/cv-real")
def test_cross_validated_numbers_match_their_csvs():
    """docs/results.md's cross-validation tables are the report of results/cv-real, and every
    interval the README quotes ("81.5 [76.3, 86.1]") is one of that report's."""
    tables = TABLES.read_text()
    shown = tables.split(CV_START, 1)[1].split(CV_END, 1)[0].strip()
    text = report(CV).strip()
    assert shown == text, "paste `python -m brainhpc.sweep report results/cv-real` between the "\
        "cv-real markers of docs/results.md"
    readme = README.read_text()
    part = readme.split("**The real arms with intervals", 1)[1].split("What the numbers say", 1)[0]
    quoted = INTERVAL.findall(part)
    assert len(quoted) >= 10
    report_text = text.replace("+", "")
    for q in quoted:
        assert q.replace("+", "") in report_text, f"README quotes {q}, not in results/cv-real"
