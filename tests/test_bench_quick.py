"""Smoke test of the benchmark suite: ``bench/run_all.py --quick`` runs and writes every section.

No timing is asserted: only that each script runs end to end at tiny sizes and that the
generated markdown holds its sections, commands, ratios, target checks and plots. One test
does the whole run (so that pytest-xdist does not start it twice).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k"


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/run_all.py", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,  # five sections on 2 cores that the rest of the suite shares
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "BENCHMARKS.md").read_text()

    # machine, sections, commands
    assert "CPU:" in md and "torch" in md and "numba" in md
    for heading in (
        "## Compression cost (time and peak memory)",
        "## Size in memory and on disk",
        "## Lookup throughput",
        "## Op boundary (torch custom ops)",
        "## Model quality: DLRM on MovieLens-100k",
        "## Targets at a glance",
        "## What these numbers mean",
    ):
        assert heading in md, heading
    assert "This section failed" not in md
    for script in ("compress_cost", "size", "lookup", "deploy", "quality_ml100k"):
        assert f"bench/{script}.py --quick" in md, script

    # ratios measured in the same run
    assert "time ours/ref" in md and "speed-up" in md and "peak beyond input" in md  # compression
    assert "How time grows with rows" in md
    assert "×float32" in md and "8-bit vs ref" in md and "8-bit vs FBGEMM" in md  # size
    assert "×ref" in md and "M lookups/s" in md  # lookups
    assert "op/direct" in md and "module − float32" in md  # op boundary
    assert md.count("**PASS**") + md.count("**FAIL**") >= 5
    for png in ("compress_cost.png", "size.png", "lookup.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
        assert f"]({png})" in md, png

    # quality: measured when the data is there, a clear skip otherwise
    quality = (tmp_path / "quality_ml100k.md").read_text()
    if (ML100K / "ml-100k.inter").is_file():
        assert "float32 model: test AUC" in quality
        assert "reference 8-bit" in quality and "AUC ours−ref" in quality
        assert (tmp_path / "quality_ml100k.png").stat().st_size > 1000
    else:
        assert "SKIPPED: MovieLens-100k not found" in quality


def test_quality_script_skips_cleanly_without_data(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "bench/quality_ml100k.py",
            "--quick",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SKIPPED: MovieLens-100k not found" in proc.stdout
    assert "SKIPPED" in (tmp_path / "quality_ml100k.md").read_text()
