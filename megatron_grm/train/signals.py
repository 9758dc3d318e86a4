"""Turn SIGTERM / SIGUSR1 (Slurm's time-limit warning, preemption) into "checkpoint, then exit"."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

EXIT_CODE_PREEMPTED = 75  # EX_TEMPFAIL: the job stopped on request after checkpointing; requeue it


class StopRequest:
    """Set by a signal handler; the training loop checks it between steps (never mid-step)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.requested = False
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self.requested = True
        self.signum = signum
