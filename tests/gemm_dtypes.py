"""Which dtypes the GEMMs of a block of code multiply: every matrix-product op torch dispatches (``mm``,
``addmm``, ``bmm``, ``baddbmm``, oneDNN's linear), with the dtypes of its tensor operands."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_GEMMS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul", "aten.linear",
          "mkldnn._linear_pointwise")


class GemmDtypes(TorchDispatchMode):
    """``with GemmDtypes() as seen: ...`` then ``seen.calls``: (op name, operand dtypes) per GEMM, forward
    and backward alike (autograd's backward ops dispatch through the mode too)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(_GEMMS):
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.calls.append((name, dtypes))
        return func(*args, **(kwargs or {}))

    def with_dtype(self, dtype: torch.dtype) -> list[str]:
        """The GEMMs that multiplied an operand of ``dtype``."""
        return [name for name, dtypes in self.calls if dtype in dtypes]
