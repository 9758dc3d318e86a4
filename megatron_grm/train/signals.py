"""Turn SIGTERM / SIGUSR1 (Slurm's time-limit warning, preemption) into "checkpoint, then exit"."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

log = logging.getLogger(__name__)

EXIT_CODE_PREEMPTED = 75  # EX_TEMPFAIL: the job stopped on request after checkpointing; requeue it
# Written into $GRM_RUN_DIR (the Slurm scripts' run folder) once every rank's state is on disk: a rank
# that then hangs in teardown and is killed makes srun report 137, and the script still knows to requeue.
STOPPED_MARKER = "stopped_on_signal"


def exit_for_requeue(detail: str = "") -> NoReturn:
    """Exit 75 after a stop signal, once this stage's state is saved on every rank (the caller's barrier or
    collective save). Rank 0 first marks the Slurm run folder, when there is one."""
    import torch.distributed

    run_dir = os.environ.get("GRM_RUN_DIR")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if run_dir and rank == 0 and os.path.isdir(run_dir):
        from megatron_grm.train.checkpoint import write_atomically

        write_atomically(os.path.join(run_dir, STOPPED_MARKER), f"{detail}\n")
    sys.exit(EXIT_CODE_PREEMPTED)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_installed: StopRequest | None = None


def stop_request() -> StopRequest:
    """The process's stop request, its handlers installed on the first call. A stage installs it before
    any work (``stages.common.run_stage``): a signal during data loading, the model build or MetaRM's
    judgment sampling is then a request the loop honours after its next step, not Python's default
    action for SIGUSR1/SIGTERM, which kills the rank with no checkpoint and no requeue."""
    global _installed
    if _installed is None:
        _installed = StopRequest()
    return _installed


class StopRequest:
    """Set by a signal handler; the training loop checks it between steps (never mid-step). Use
    :func:`stop_request` for the process's one instance: a second would take the handlers from the first."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.requested = False
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self.requested = True
        self.signum = signum
