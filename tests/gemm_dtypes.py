"""Which dtypes the GEMMs of a block of code multiply: every matrix-product op torch dispatches (``mm``,
``addmm``, ``bmm``, ``baddbmm``, oneDNN's linear), and optionally its attention kernels (SDPA's CPU flash
and math kernels, forward and backward), with the dtypes of their floating-point operands."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_GEMMS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.matmul", "aten.linear",
          "mkldnn._linear_pointwise")
_ATTENTION = ("aten._scaled_dot_product", "aten.scaled_dot_product")


class GemmDtypes(TorchDispatchMode):
    """``with GemmDtypes() as seen: ...`` then ``seen.calls``: (op name, operand dtypes) per GEMM, forward
    and backward alike (autograd's backward ops dispatch through the mode too). ``attention=True`` records
    the attention kernels as well."""

    def __init__(self, attention: bool = False) -> None:
        super().__init__()
        self.ops = _GEMMS + (_ATTENTION if attention else ())
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(self.ops):
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            self.calls.append((name, dtypes))
        return func(*args, **(kwargs or {}))

    def with_dtype(self, dtype: torch.dtype) -> list[str]:
        """The GEMMs that multiplied an operand of ``dtype``."""
        return [name for name, dtypes in self.calls if dtype in dtypes]

    def dtype_names(self) -> list[str]:
        """Every operand dtype seen, as sorted names (``"torch.float32"``)."""
        return sorted({str(dtype) for _, dtypes in self.calls for dtype in dtypes})
