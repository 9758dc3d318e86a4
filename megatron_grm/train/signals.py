"""Turn SIGTERM / SIGUSR1 (Slurm's time-limit warning, preemption) into "checkpoint, then exit"."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

EXIT_CODE_PREEMPTED = 75  # EX_TEMPFAIL: the job stopped on request after checkpointing; requeue it


def _shield_checkpoint_helpers(signals: tuple[int, ...]) -> None:
    """Start Megatron-Core's checkpoint-writer helper process with our stop signals ignored.

    Slurm signals every process of a job step; the spawned multiprocessing Manager that
    dist_checkpointing's async filesystem writer uses (``filesystem_async._get_write_results_queue``,
    megatron-core 0.16.1) would die of SIGTERM/SIGUSR1 and the checkpoint-on-signal save would then fail.
    An ignored signal stays ignored across the spawn, so the helper survives while we checkpoint.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        filesystem_async._get_write_results_queue()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopRequest:
    """Set by a signal handler; the training loop checks it between steps (never mid-step)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.requested = False
        self.signum: int | None = None
        _shield_checkpoint_helpers(signals)
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self.requested = True
        self.signum = signum
