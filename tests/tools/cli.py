"""Run a tool from tools/ as a user would (a plain ``python tools/<name>.py``), returning its result."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO, REPO_PYTHONPATH


def run_tool(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = REPO_PYTHONPATH
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if lines else ""
