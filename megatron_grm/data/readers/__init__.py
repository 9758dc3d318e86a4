"""Readers that turn source files into :class:`~megatron_grm.data.examples.Example` lists.

Every reader returns a :class:`ReadResult` and takes ``on_error="fail" | "skip"``: bad records raise a
:class:`RecordError` naming file, line or record, and field, or are skipped and counted, never silently.
Formats: our JSONL (``jsonl``), RMB (``rmb``), verifiable math from CHAMP and reasoning-gym
(``verifiable_math``). See docs/data_format.md.
"""

from megatron_grm.data.readers.common import ReadResult, RecordError, SeenIds
from megatron_grm.data.readers.jsonl import read_jsonl, write_jsonl
from megatron_grm.data.readers.rmb import read_rmb, read_rmb_file
from megatron_grm.data.readers.verifiable_math import read_champ, read_reasoning_gym

__all__ = [
    "ReadResult",
    "RecordError",
    "SeenIds",
    "read_champ",
    "read_jsonl",
    "read_reasoning_gym",
    "read_rmb",
    "read_rmb_file",
    "write_jsonl",
]
