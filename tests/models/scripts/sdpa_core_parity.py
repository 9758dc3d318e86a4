"""One rank (torchrun): the local spec's SDPA core attention against Megatron-Core's own unfused
``DotProductAttention`` on the same q/k/v — forward and input gradients — for the masks training and
rollouts pass. Writes a JSON report of max abs differences."""

from __future__ import annotations

import argparse
import json

import torch

import megatron_grm  # noqa: F401  (before Megatron-Core: it then imports without TorchDynamo)
from tests.gemm_dtypes import GemmDtypes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_grm.data.packing import collate_padded
    from megatron_grm.models.config import ModelConfig
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import build_model, transformer_config
    from megatron_grm.models.sdpa_attention import mask_plan, sdpa_core_attention_class
    from megatron_grm.parallel import ParallelLayout, destroy_parallel, init_parallel
    from megatron_grm.rollout.alignment import left_pad, window_attention_mask

    layout = ParallelLayout()
    init_parallel(layout, seed=0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                      num_query_groups=2, vocab_size=256)
    config = transformer_config(cfg, layout, PrecisionConfig("fp32"))
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    megatron, ours = DotProductAttention(**kwargs), sdpa_core_attention_class()(**kwargs)

    g = torch.Generator().manual_seed(0)
    s, b, n, ng, d = 12, 3, 8, 2, 8

    def qkv(sq: int, sk: int):
        return [torch.randn(length, b, heads, d, generator=g, requires_grad=True)
                for length, heads in ((sq, n), (sk, ng), (sk, ng))]

    # Block-diagonal packing mask (True = masked): documents of 5 and 7 tokens in row 0, one of 12 elsewhere.
    segment = torch.zeros(b, s, dtype=torch.long)
    segment[0, 5:] = 1
    packed = ~((segment[:, :, None] == segment[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril())
    _, key_padding = left_pad([[1] * 12, [1] * 7, [1] * 4], 0, s)
    # One document per row, right-padded (collate_padded): ours attends with is_causal, Megatron reads the mask.
    right_padded = collate_padded([([5] * n, [1] * n) for n in (12, 7, 4)], seq_length=s)["attention_mask"]
    real = torch.arange(s)[:, None] < torch.tensor([12, 7, 4])[None, :]  # [s, b]: the positions anything reads
    cases = {  # name: (sq, sk, mask given to ours, mask given to Megatron's)
        "causal_no_mask": (s, s, None, None),
        "packed_documents": (s, s, packed[:, None], packed[:, None]),
        "right_padded_documents": (s, s, right_padded, right_padded),
        "left_padded_prefill": (s, s, *[window_attention_mask(key_padding, 0, s)] * 2),
        "queries_after_a_cache": (4, s, None, window_attention_mask(torch.zeros(b, s, dtype=torch.bool), s - 4, s)),
    }
    report: dict = {"core_class": type(ours).__name__}
    for name, (sq, sk, mask_ours, mask_megatron) in cases.items():
        q, k, v = qkv(sq, sk)
        # Padding positions' outputs are read by nothing (no loss, no later query): compare the rest.
        reads = (real if name == "right_padded_documents" else torch.ones(sq, b, dtype=torch.bool))[..., None]
        want = megatron(q, k, v, mask_megatron)
        grads_want = torch.autograd.grad((want.square() * reads).sum(), (q, k, v))
        got = ours(q, k, v, mask_ours)
        grads_got = torch.autograd.grad((got.square() * reads).sum(), (q, k, v))
        report[name] = {"shape_equal": list(got.shape) == list(want.shape),
                        "forward": float(((got - want) * reads).abs().max()),
                        "grad": max(float((a - c).abs().max()) for a, c in zip(grads_got, grads_want)),
                        "scale": float(want.abs().max())}
    for name in ("right_padded_documents", "packed_documents", "left_padded_prefill"):
        plan = mask_plan(cases[name][2], torch.float32)
        report[name]["is_causal"], report[name]["left_pads"] = plan.is_causal, plan.left_pads
    report["bf16"] = bf16_cases(cfg, layout, cases)
    model = build_model(cfg, layout, PrecisionConfig("fp32"), use_te=False)
    report["model_cores"] = sorted({type(m.core_attention).__name__ for m in model.modules()
                                    if hasattr(m, "core_attention")})
    report["mlp_activations"] = sorted({type(m.activation_func).__name__ for m in model.modules()
                                        if hasattr(m, "linear_fc1")})
    report["use_te_activation_func"] = model.config.use_te_activation_func

    # The guard the TE spec puts on its causal cores (which ignore masks), exercised on ours.
    from megatron_grm.models.provider import refuse_masks_the_core_ignores

    report["guarded_cores"] = refuse_masks_the_core_ignores(model, sdpa_core_attention_class())
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    positions = torch.arange(s)[None].expand(b, s)

    def forward(mask, training: bool) -> str:
        model.train(training)
        try:
            model(tokens, positions, mask)
            return "ok"
        except ValueError as e:
            return str(e)

    report["guard"] = {"right_padded": forward(right_padded, True), "no_mask": forward(None, True),
                       "packed_training": forward(packed[:, None], True),
                       "packed_inference": forward(packed[:, None], False)}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    destroy_parallel()


def bf16_cases(cfg, layout, cases: dict) -> dict:
    """bf16 q/k/v through the SDPA core with ``widen_bf16`` off and on: the dtypes its attention kernels
    multiply, and how far its output and input gradients (for a fixed output gradient) are from the exact
    float64 ones on the same bf16 values, beyond one bf16 rounding (2^-8 relative) plus fp32 sums."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_grm.models import sdpa_attention
    from megatron_grm.models.precision import PrecisionConfig
    from megatron_grm.models.provider import transformer_config

    config = transformer_config(cfg, layout, PrecisionConfig("bf16"))
    core = sdpa_attention.sdpa_core_attention_class()(config=config, layer_number=1,
                                                      attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator().manual_seed(1)
    report = {}
    for name in ("causal_no_mask", "packed_documents"):
        sq, sk, mask, _ = cases[name]
        q, k, v = (torch.randn(length, 3, heads, 8, generator=g).bfloat16()
                   for length, heads in ((sq, 8), (sk, 2), (sk, 2)))
        grad_out = torch.randn(sq, 3, 64, generator=g).bfloat16()
        exact_inputs = [t.double().requires_grad_() for t in (q, k, v)]
        exact = core(*exact_inputs, mask)
        exact_grads = torch.autograd.grad(exact, exact_inputs, grad_out.double())
        for widen in (False, True):
            sdpa_attention.widen_bf16 = widen
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            with GemmDtypes(attention=True) as dtypes:
                out = core(*inputs, mask)
                grads = torch.autograd.grad(out, inputs, grad_out)

            def excess(got: torch.Tensor, want: torch.Tensor) -> float:
                bound = 2 ** -8 * want.abs() + 1e-5 * want.abs().max()
                return float(((got.double() - want).abs() - bound).max())

            report[f"{name}_{'widened' if widen else 'bf16'}"] = {
                "attention_dtypes": dtypes.dtype_names(), "output_dtype": str(out.dtype),
                "grad_dtypes": sorted({str(t.dtype) for t in grads}),
                "forward_excess": excess(out, exact.detach()),
                "grad_excess": max(excess(a, b) for a, b in zip(grads, exact_grads)),
                "scale": float(exact.abs().max())}
    sdpa_attention.widen_bf16 = False
    return report


if __name__ == "__main__":
    main()
