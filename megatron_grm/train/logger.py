"""Per-step metrics: TensorBoard scalars and one concise console line, on the logging rank only; and the
reader that gets a run's scalars back (the demo's summary, the tests)."""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger("megatron_grm.train")


class RunLogger:
    """Writes scalars to ``<run_dir>/tensorboard``; every rank may call it, one rank writes."""

    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.folder = os.path.join(run_dir, "tensorboard")
        self.purge_step: int | None = None
        self._writer = None

    def purge_from(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: hide what an earlier attempt logged for
        ``step`` and later (TensorBoard's purge, written at the start of an event file). Scalars this
        attempt already wrote (RFT's sampling statistics at step 0) stay in the file that holds them;
        the next scalar opens a new file that starts with the purge."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.purge_step = step

    @property
    def writer(self):
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.folder, exist_ok=True)
            self._writer = SummaryWriter(log_dir=self.folder, purge_step=self.purge_step)
        return self._writer

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.writer:
            return
        for name, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(f"{prefix}{name}", value, step)
        self.writer.flush()

    def console(self, step: int, max_steps: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}/{max_steps}"]
        for name, value in values.items():
            if value is None:
                continue
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._writer:
            self._writer.close()


def read_scalars(run_dir: str | os.PathLike, tag: str) -> list[float]:
    """Every value of one scalar in ``<run_dir>/tensorboard``, ordered by step (read from the event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
