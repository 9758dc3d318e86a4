"""How the conversion tools get their processes: torchrun when asked for TP*PP > 1, one process otherwise.

The tools may be started plainly (``python tools/convert_hf_to_mcore.py --tp 2``): they then start
themselves again under ``torch.distributed.run`` with TP*PP processes. A single process still needs a
rendezvous address for gloo; a free port is picked so concurrent runs on one machine do not collide.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(script: str, argv: list[str], nproc: int) -> int:
    """Run ``script argv`` as ``nproc`` torchrun workers on this machine; returns their exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           script, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def prepare_single_process() -> None:
    """Rendezvous variables for a one-process gloo group, unless a launcher already set them."""
    if under_torchrun():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
