"""Rollout in a different parallel layout than training, with Megatron-Core's refit (resharding).

When the policy trains at, say, TP=2 but samples faster at TP=1 (more, smaller replicas), the rollout
engine runs on a second GPTModel built over its own process groups, and before each rollout
``megatron.core.resharding.refit.swap_model_weights`` copies the trainer's current weights into it,
resharding on the way (gloo on CPU, NCCL on GPU). No checkpoint round trip, no copy to disk.
"""

from __future__ import annotations

import torch

from megatron_grm.models.config import ModelConfig
from megatron_grm.models.precision import PrecisionConfig
from megatron_grm.parallel.distributed import ParallelLayout


def _group_containing_me(blocks: list[list[int]]):
    """new_group is collective over the world: every rank creates every block, keeps its own."""
    mine = None
    rank = torch.distributed.get_rank()
    for ranks in blocks:
        group = torch.distributed.new_group(ranks=ranks)
        if rank in ranks:
            mine = group
    return mine


def inference_process_groups(tensor_parallel: int):
    """A ProcessGroupCollection for TP = ``tensor_parallel``, PP = CP = EP = 1, DP = the rest of the world.

    TP groups are consecutive ranks (as in Megatron's default order), so on a node the TP peers are
    neighbours. Collective: every rank must call it, in the same order.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = torch.distributed.get_world_size()
    if world % tensor_parallel:
        raise ValueError(f"rollout tensor_parallel={tensor_parallel} does not divide the world size {world}")
    tp = _group_containing_me([list(range(s, s + tensor_parallel)) for s in range(0, world, tensor_parallel)])
    dp = _group_containing_me([list(range(j, world, tensor_parallel)) for j in range(tensor_parallel)])
    one = _group_containing_me([[r] for r in range(world)])
    every = torch.distributed.group.WORLD
    return ProcessGroupCollection(
        tp=tp, cp=one, pp=one, ep=one, dp=dp, embd=one, pos_embd=one,
        tp_cp=tp, mp=tp, dp_cp=dp, tp_dp_cp=every, expt_tp=tp, expt_dp=dp, tp_ep=tp, tp_ep_pp=tp,
    )


def build_inference_model(cfg: ModelConfig, precision: PrecisionConfig, tensor_parallel: int, vocab_size: int):
    """A GPTModel for rollouts at its own TP size; its weights come from :func:`refit`.

    ``vocab_size`` must be the training model's (padded) vocabulary so the two agree row for row.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_grm.models.provider import decoder_spec, params_to_dtype, transformer_config
    from megatron_grm.parallel.device import device, use_te_spec

    if cfg.family not in ("llama", "qwen2"):
        raise NotImplementedError(
            f"model.family={cfg.family!r}: a separate rollout layout needs the family's model class to accept "
            "a pg_collection; only llama and qwen2 (Megatron's GPTModel) are wired here"
        )
    config = transformer_config(cfg, ParallelLayout(tensor_parallel=tensor_parallel), precision)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(cfg, use_te_spec(), config),  # the training model's norms, final too
        vocab_size=vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=float(cfg.rotary_base),
        pg_collection=inference_process_groups(tensor_parallel),
    )
    # As build_model does: the local spec leaves its norm weights fp32 in a bf16 model, and a cross-rank
    # refit receives into buffers of the target's dtype.
    params_to_dtype(model, model.config.params_dtype)
    return model.to(device())


@torch.no_grad()
def refit(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy (and reshard) the current weights of ``source`` into ``target``. Collective over the world."""
    from megatron.core.resharding.refit import swap_model_weights
    from megatron.core.utils import unwrap_model

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        # Megatron's NCCL copy service copies same-rank shards on its own stream without waiting for the
        # default stream, where the optimizer's last update may still be running.
        torch.cuda.synchronize()
    swap_model_weights(unwrap_model(source), unwrap_model(target), backend)
