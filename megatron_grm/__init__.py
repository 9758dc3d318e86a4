"""megatron-grm: generative reward models trained with SPCT on Megatron-Core."""

from megatron_grm.parallel.lazy_compile import defer_compile_in_megatron_core_import

defer_compile_in_megatron_core_import()  # before anything imports Megatron-Core: its fused kernels compile lazily
