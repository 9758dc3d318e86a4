"""How the conversion tools get their processes: torchrun when asked for TP*PP > 1, one process otherwise.

The tools may be started plainly (``python tools/convert_hf_to_mcore.py --tp 2``): they then start
themselves again under ``torch.distributed.run`` with TP*PP processes. A single process gets its rendezvous
address from :func:`megatron_grm.parallel.distributed.init_parallel` (a free port).
"""

from __future__ import annotations

import os
import subprocess
import sys


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(script: str, argv: list[str], nproc: int) -> int:
    """Run ``script argv`` as ``nproc`` torchrun workers on this machine; returns their exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           script, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)
