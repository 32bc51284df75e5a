"""A short smoke run of each benchmark, so the harness keeps working (no speed thresholds here)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_gatekeeper_benchmark_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.gatekeeper", "--seconds", "0.5", "--runs", "1", "--clients", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = json.loads(result.stdout)
    assert run["requests"] > 0 and run["errors"] == 0
    assert run["decision_p99_ms"] is not None and run["client_p99_ms"] is not None
