"""megatron-grm: generative reward models trained with SPCT on Megatron-Core."""

from megatron_grm.parallel.lazy_compile import import_megatron_core

import_megatron_core()  # first, so that Megatron's fused kernels are compiled on first use, not at import
