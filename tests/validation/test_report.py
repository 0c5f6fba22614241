"""The validation report runs end to end (quick mode) and writes its table and pictures."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_report(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "validation.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("report.md", "results.json", "pareto_m2.png", "scatter_2d.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the exact target through the same sampler is the floor; the blend is close but not exact
    assert summary["target (same sampler)"]["median_weighted"] < summary["DB (exact bases)"]["median_weighted"] < 0.5
