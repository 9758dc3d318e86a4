"""The one file a torchrun test script hands back: every rank computed the report, rank 0 writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_on_rank0(path: str | Path, report: Any) -> None:
    """Write ``report`` as JSON to ``path`` from rank 0 only (the test reads it with ``read_json``)."""
    import torch.distributed

    if torch.distributed.get_rank() == 0:
        Path(path).write_text(json.dumps(report))
