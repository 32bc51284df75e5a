"""The package's layout: the pure core (spec, plan, render, backends) starts nothing and imports no daemon."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

# Every package that runs something (a daemon, the deploy engine, the CLI) and the web frameworks the daemons use.
DAEMONS = (
    "controller.gateway",
    "controller.agent",
    "controller.swap",
    "controller.console",
    "controller.deploy",
    "controller.mesh",
    "controller.images",
    "controller.local",
    "controller.cli",
    "fastapi",
    "uvicorn",
)


def test_core_imports_no_daemon() -> None:
    probe = (
        "import sys\n"
        "import controller.spec, controller.plan, controller.render, controller.backends\n"
        "from controller.render import compose, quadlet, envoy, caddy, prometheus, rules, alertmanager, grafana, guard\n"
        f"print(sorted(m for m in sys.modules if m.startswith({DAEMONS!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the core imported daemon modules: {result.stdout.strip()}"
