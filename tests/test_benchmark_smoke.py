"""The benchmark harness at a tiny size: it must produce every figure, the JSON, the table and the
plot. How fast anything is does not matter here (the benchmark itself reports speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

FIGURES = {
    "ingest",
    "drain",
    "drain_variants",
    "machinery",
    "reads_profile",
    "reads_image",
    "reads_image_uncached",
    "reads_image_redirect",
    "reads_variant",
    "end_to_end",
    "naive_latency",
    "naive_outage",
    "growth_claim_finished",
    "growth_drain_finished",
    "growth_claim_backlog",
    "growth_drain_backlog",
    "machinery_at_scale",
    "memory",
}


# Every figure of the harness, each twice over (the tiny profile's repetitions): minutes on a busy 2-core machine.
@pytest.mark.timeout(600)
def test_the_tiny_benchmark_produces_every_figure_with_its_reference_a_table_and_a_plot(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--profile", "tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    assert set(report["figures"]) == FIGURES
    for name, figure in report["figures"].items():
        ours = figure["ours"]
        summaries = list(ours.values()) if "median" not in ours else [ours]
        for summary in summaries:
            assert len(summary["samples"]) >= 2 and summary["min"] <= summary["median"] <= summary["max"], name
        assert name == "end_to_end" or figure["references"], name
        assert isinstance(figure["met"], bool)
    assert report["figures"]["naive_outage"]["ours"]["median"] == 1.0
    # Every stage of a write was seen by the workers' histograms (all zeros would mean none was).
    stages = report["figures"]["end_to_end"]["stages"]
    assert set(stages) == {"enqueue to claim", "claim to upload start", "upload", "publish"}
    assert all(stage["p99"] > 0 for stage in stages.values()), stages
    table = (tmp_path / "latest.md").read_text()
    assert all(figure["title"] in table for figure in report["figures"].values())
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")
