"""Sequence parallelism (torchrun, TP=2): Megatron's real ColumnParallelLinear output layer built with
``sequence_parallel=True`` behind ``output_at``'s selection, against one process's plain-torch loss on the
gathered weight and the full hidden states. Rank 0 writes ``<out>`` (JSON of max abs differences).

The whole GPTModel cannot run sequence-parallel on CPU (its norms need Transformer Engine), so the decoder's
output is a random ``[seq/TP, batch, hidden]`` slice per rank, the layout the output layer receives.
"""

from __future__ import annotations

import sys

import torch

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)
from tests.report import write_on_rank0


class OutputHead(torch.nn.Module):
    """The part of GPTModel that ``output_at`` touches: ``post_process``, ``output_layer`` and the loss."""

    post_process = True

    def __init__(self, output_layer: torch.nn.Module) -> None:
        super().__init__()
        self.output_layer = output_layer

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel

        logits, _ = self.output_layer(hidden)
        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous()).t()


def main(out: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel
    from megatron_grm.parallel.loss_positions import LossPositions, output_at

    tp = 2
    init_parallel(ParallelLayout(tensor_parallel=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    seq, batch, hidden, vocab = 8, 3, 16, 24
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, tensor_model_parallel_size=tp,
                               sequence_parallel=True, use_cpu_initialization=True)
    layer = ColumnParallelLinear(hidden, vocab, config=config, init_method=torch.nn.init.normal_, bias=False,
                                 gather_output=False)
    head = OutputHead(layer)

    gen = torch.Generator().manual_seed(0)
    full_hidden = torch.randn(seq, batch, hidden, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    loss_mask = (torch.rand(batch, seq, generator=gen) > 0.5).float()
    weights = torch.randn(batch, seq, generator=gen)

    # Ours: this rank's sequence slice, the selection under sequence parallelism.
    part = seq // tp
    mine = full_hidden[rank * part:(rank + 1) * part].clone().requires_grad_(True)
    positions = LossPositions(loss_mask)
    with output_at(head, positions):
        nll = positions.scatter(head(mine, positions.gather(labels)))
    restored = bool(layer.sequence_parallel)
    (nll * weights).sum().backward()

    # Reference: the full weight, every position, plain torch.
    shards = [torch.empty_like(layer.weight) for _ in range(tp)]
    torch.distributed.all_gather(shards, layer.weight.detach(), group=parallel_state.get_tensor_model_parallel_group())
    weight = torch.cat(shards).requires_grad_(True)
    ref_hidden = full_hidden.clone().requires_grad_(True)
    logp = torch.log_softmax(ref_hidden @ weight.t(), dim=-1)  # [s, b, v]
    ref_nll = -logp.gather(-1, labels.t()[..., None]).squeeze(-1).t() * loss_mask
    (ref_nll * weights).sum().backward()

    rows = vocab // tp
    report = {
        "loss_positions": positions.count,
        "nll_diff": float((nll.detach() - ref_nll.detach()).abs().max()),
        "hidden_grad_diff": float((mine.grad - ref_hidden.grad[rank * part:(rank + 1) * part]).abs().max()),
        "hidden_grad_max": float(ref_hidden.grad.abs().max()),
        "weight_grad_diff": float((layer.weight.grad - weight.grad[rank * rows:(rank + 1) * rows]).abs().max()),
        "weight_grad_max": float(weight.grad.abs().max()),
        "sequence_parallel_restored": restored,
    }
    write_on_rank0(out, report)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
