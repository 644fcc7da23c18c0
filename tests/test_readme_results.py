"""The README's Results tables are exactly what the committed results/ CSVs hold."""

from __future__ import annotations

import json
import re

import pytest

from brainhpc.sweep.aggregate import report
from brainhpc.sweep.config import REPO

RESULTS = REPO / "results"
START, END = "<!-- results:tables:start -->", "<!-- results:tables:end -->"


@pytest.mark.skipif(not (RESULTS / "metrics.csv").exists(),
                    reason="no committed results/ yet (the study has not been published)")
def test_readme_tables_match_results_csv():
    readme = (REPO / "README.md").read_text()
    assert START in readme and END in readme, "README.md lacks the results table markers"
    shown = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert shown == report(RESULTS).strip(), (
        "README tables differ from results/*.csv: paste `python -m brainhpc.sweep report "
        "results` between the markers")
    prov = json.loads((RESULTS / "provenance.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]) and prov["command"]
    assert prov["commit"] in readme and prov["command"] in readme
    for png in re.findall(r"\((results/[^)]+\.png)\)", readme):
        assert (REPO / png).is_file(), png
