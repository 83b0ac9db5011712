"""benchmarks/kernel_times.py: in one process, and comparing builds in processes of their own."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "kernel_times.py"
TINY = ["--device", "cpu", "--shape", "1", "2", "12", "10", "--repeats", "1", "--calls", "2", "--threads", "1"]


def run(*args):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def rows(table):
    """{case: [microseconds per column]} of a markdown table printed by the script."""
    found = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        found[cells[0]] = [float(cell) for cell in cells[1:]]
    return found


def test_times_every_case_of_every_pass_and_dtype():
    table = rows(run("--dtypes", "float32", "float64", "--kernels", "3", "11"))
    cases = {f"{d} {p} {k}" for d in ("float32", "float64") for p in ("forward", "gradient") for k in (3, 11)}
    assert set(table) == cases
    assert all(len(times) == 1 and times[0] > 0 for times in table.values())


def test_compares_builds_in_columns_of_their_own():
    output = run("--kernels", "5", "--passes", "forward", "--builds", str(REPO), str(REPO), "--rounds", "1")
    header = output.splitlines()[0]
    assert header.count(str(REPO)) == 2, header
    (times,) = rows(output).values()
    assert len(times) == 2 and all(t > 0 for t in times)
    assert re.match(r"\| float32 forward 5 \|", output.splitlines()[2])
