"""parallel/grad_zeroing.py under torchrun: Megatron's real linears in Megatron's real DDP, two steps.

The model: ``a`` and ``b`` (Megatron column-parallel linears, the GEMM's weights), ``custom`` (a subclass with
its own forward, whose gradient reaches ``main_grad`` through ``.grad`` and DDP's hook) and a norm-like
scale. Step 1 runs two micro-batches through everything; step 2 one micro-batch that skips ``b``, with
``a``'s stale gradient replaced by NaN before the backward (what a skipped non-finite step leaves). Each
step's ``main_grad`` is compared with plain torch's gradient of the same loss. Rank 0 writes ``<out>``.
"""

from __future__ import annotations

import sys

import torch

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)
from tests.report import write_on_rank0

HIDDEN = 8


class Model(torch.nn.Module):
    def __init__(self, config) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear

        class OwnForward(ColumnParallelLinear):
            def forward(self, x):  # not Megatron's GEMM: the weight's gradient comes through .grad
                return torch.nn.functional.linear(x, self.weight), None

        super().__init__()
        init = torch.nn.init.normal_
        linear = dict(config=config, init_method=init, bias=False, gather_output=True)
        self.a = ColumnParallelLinear(HIDDEN, HIDDEN, **linear)
        self.b = ColumnParallelLinear(HIDDEN, HIDDEN, **linear)
        self.custom = OwnForward(HIDDEN, HIDDEN, **linear)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, HIDDEN))

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        y = self.a(x)[0] * self.scale
        if use_b:
            y = self.b(y)[0]
        return self.custom(y)[0]


def reference_grads(model: Model, batches: list[torch.Tensor], use_b: bool) -> dict[str, torch.Tensor]:
    """Plain torch on copies of the weights: the summed gradient of the step's micro-batches."""
    weights = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    for x in batches:
        y = x @ weights["a.weight"].t() * weights["scale"]
        if use_b:
            y = y @ weights["b.weight"].t()
        (y @ weights["custom.weight"].t()).square().sum().backward()
    return {n: w.grad if w.grad is not None else torch.zeros_like(w) for n, w in weights.items()}


def step(ddp, model: Model, finalize, batches: list[torch.Tensor], use_b: bool, poison: str | None = None) -> dict:
    ddp.zero_grad_buffer()  # Megatron's, with the buffers' reset GradZeroing installed
    kept = {n: bool(p.main_grad.abs().sum() > 0) for n, p in model.named_parameters()}  # not zeroed
    if poison:
        dict(model.named_parameters())[poison].main_grad.fill_(float("nan"))
    for x in batches:
        ddp(x, use_b).square().sum().backward()
    unwritten = finalize()
    want = reference_grads(model, batches, use_b)
    diff = {n: float((p.main_grad - want[n]).abs().max()) for n, p in model.named_parameters()}
    return {"kept_after_zeroing": kept, "unwritten": unwritten, "max_diff": diff,
            "b_grad_norm": float(model.b.weight.main_grad.norm()),
            "norms": {n: float(want[n].norm()) for n in want}}


def main(out: str) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from megatron_grm.parallel import wgrad_gemm
    from megatron_grm.parallel.distributed import ParallelLayout, destroy_parallel, init_parallel
    from megatron_grm.parallel.grad_zeroing import GradZeroing

    init_parallel(ParallelLayout())
    assert wgrad_gemm.install(cuda=False).startswith("torch")
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, use_cpu_initialization=True,
                               gradient_accumulation_fusion=True)
    torch.manual_seed(0)
    def wrapped(model: Model):
        return DistributedDataParallel(config=config, module=model,
                                       ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))

    model = Model(config)
    ddp = wrapped(model)
    zeroing = GradZeroing(ddp)
    finalized: list[int] = []
    finalize = zeroing.finalize_after(lambda *args, **kwargs: finalized.append(len(args)))
    names = {id(p): n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, HIDDEN, generator=gen) for _ in range(3)]

    def run_finalize() -> list[str]:
        """The schedule's finalize call; returns the weights still marked (unwritten) before it."""
        marked = [n for n, p in model.named_parameters() if getattr(p.main_grad, wgrad_gemm._OVERWRITE, False)]
        finalize([ddp])
        return marked

    report = {
        "overwritten": sorted(names[id(w)] for w in zeroing.weights),
        "zeroed_fraction": zeroing.zeroed_fraction,
        "step1": step(ddp, model, run_finalize, batches[:2], use_b=True),
        "step2": step(ddp, model, run_finalize, batches[2:], use_b=False, poison="a.weight"),
        "finalize_calls": len(finalized),
    }
    other = wrapped(Model(config))
    full = GradZeroing(other, enabled=False)
    report["disabled"] = {"overwritten": len(full.weights),
                          "megatrons_reset": all("reset" not in vars(b) for b in other.buffers)}
    write_on_rank0(out, report)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
