"""The oneDNN training forward under tensor parallelism (torchrun, TP=2): Megatron's real ColumnParallelLinear
then RowParallelLinear (an MLP's fc1 and fc2 split over two ranks), each rank's shard at least 512 x 512 so
the forward takes oneDNN, against float64 on the gathered weights in one process. The backward is Megatron's
with the group this forward recorded: the column layer's input gradient is all-reduced across the ranks.
With ``bf16`` after ``<out>``, the layers are bf16 and their GEMMs widened to fp32 (parallel/onednn_training.py):
float64 then runs on the same bf16 values. Rank 0 writes ``<out>`` (JSON: max differences, scales, oneDNN's
forward calls, the GEMMs counted over forward and backward and those with a bf16 operand)."""

from __future__ import annotations

import sys

import torch

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)
from tests.gemm_dtypes import GemmDtypes
from tests.report import write_on_rank0


def _gathered(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, shard.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def main(out: str, dtype: str = "fp32") -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel

    tp = 2
    init_parallel(ParallelLayout(tensor_parallel=tp))
    group = parallel_state.get_tensor_model_parallel_group()
    hidden, ffn = 512, 1024
    bf16 = dtype == "bf16"
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=8, tensor_model_parallel_size=tp,
                               use_cpu_initialization=True, bf16=bf16,
                               params_dtype=torch.bfloat16 if bf16 else torch.float32)
    init = torch.nn.init.xavier_normal_
    fc1 = ColumnParallelLinear(hidden, ffn, config=config, init_method=init, bias=False, gather_output=False)
    fc2 = RowParallelLinear(ffn, hidden, config=config, init_method=init, bias=False, input_is_parallel=True,
                            skip_bias_add=True)

    x = torch.randn(16, 2, hidden, generator=torch.Generator().manual_seed(0)).to(config.params_dtype)
    x.requires_grad_(True)
    with GemmDtypes() as seen:
        middle, _ = fc1(x)
        y, _ = fc2(torch.relu(middle))
        linear_calls = sum(name == "mkldnn._linear_pointwise" for name, _ in seen.calls)
        (y.float() ** 2).sum().backward()

    w1, w2 = _gathered(fc1.weight, 0, group).double(), _gathered(fc2.weight, 1, group).double()
    w1.requires_grad_(True)
    w2.requires_grad_(True)
    ref_x = x.detach().double().requires_grad_(True)
    ref_middle = ref_x @ w1.t()
    if bf16:  # the hidden activation as the bf16 layer rounded it
        ref_middle = ref_middle + (_gathered(middle, 2, group).double() - ref_middle).detach()
    ref_y = torch.relu(ref_middle) @ w2.t()
    (ref_y ** 2).sum().backward()

    rank, rows = parallel_state.get_tensor_model_parallel_rank(), ffn // tp
    write_on_rank0(out, {
        "onednn_calls": linear_calls,
        "gemms": len(seen.calls),
        "bf16_gemms": len(seen.with_dtype(torch.bfloat16)),
        "output_diff": float((y.double() - ref_y).abs().max()),
        "output_max": float(ref_y.abs().max()),
        "input_grad_diff": float((x.grad.double() - ref_x.grad).abs().max()),
        "input_grad_max": float(ref_x.grad.abs().max()),
        "fc1_grad_diff": float((fc1.weight.grad.double() - w1.grad[rank * rows:(rank + 1) * rows]).abs().max()),
        "fc2_grad_diff": float((fc2.weight.grad.double() - w2.grad[:, rank * rows:(rank + 1) * rows]).abs().max()),
        "weight_grad_max": float(max(w1.grad.abs().max(), w2.grad.abs().max())),
    })
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
