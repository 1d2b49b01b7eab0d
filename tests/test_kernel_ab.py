"""``bench/kernel_ab.py`` loads kernel versions side by side and flags sums that differ.

No timing is asserted: that the versions named by path, git revision and ``.`` load into
one process, that every cell is timed for each, and that a version whose sums differ from
the first's is marked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIXED = REPO / "src" / "embpress" / "layouts" / "_mixed_kernels.py"
# the walk adds a bag's summed row offsets to its values once, at the end: drop them
OFFSETS_ADDED = "b.fadd(b.load(total), _splat(b, b.load(offsets), width))"


@pytest.mark.slow
def test_versions_are_timed_side_by_side_and_differing_sums_flagged(tmp_path: Path) -> None:
    source = MIXED.read_text()
    assert OFFSETS_ADDED in source, "the walk changed: update the mutation of this test"
    mutant = tmp_path / "mutant.py"
    mutant.write_text(source.replace(OFFSETS_ADDED, "b.load(total)"))
    proc = subprocess.run(
        [sys.executable, "bench/kernel_ab.py", "--kernel", "mixed", "--table", "rowwise8",
         ".", "HEAD", str(mutant), "--rows", "3000", "--bags", "32", "--rounds", "2", "--dists", "zipf,hot"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| mixed")]
    cells = {(r[1].strip(), r[2].strip()): r for r in rows}
    for dist in ("zipf", "hot"):
        assert cells[(dist, "0: .")][-1].strip() == "yes"
        assert cells[(dist, "1: HEAD")][-1].strip() == "yes"
        assert cells[(dist, f"2: {mutant}")][-1].strip() == "**NO**"
        assert float(cells[(dist, "0: .")][5]) == 1.0
        assert float(cells[(dist, "1: HEAD")][3]) > 0


def test_unknown_version_is_one_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/kernel_ab.py", "--kernel", "mixed", "no-such-revision-xyz"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no-such-revision-xyz" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_code_width_is_one_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/kernel_ab.py", "--kernel", "block-sparse", ".", "--bits", "8,3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--bits" in proc.stderr and "'8,3'" in proc.stderr and "Traceback" not in proc.stderr
