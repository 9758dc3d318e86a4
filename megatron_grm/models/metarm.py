"""The MetaRM (paper §4.2): a scalar head on the GRM backbone that predicts whether a judgment is correct.

The MetaRM reads :func:`megatron_grm.spct.metarm_prompt` (the GRM prompt, one sampled judgment and the
question whether it is correct), takes the final hidden state (after the final norm) at the last token,
and maps it to one logit of P(judgment correct) with ``metarm_head`` — a ``Linear(hidden, 1)`` with bias,
attached as an attribute of the Megatron ``GPTModel`` on the last pipeline stage and replicated (not
sharded) across tensor-parallel ranks. Its sharded keys are ``metarm_head.weight`` / ``metarm_head.bias``,
which ``tools/convert_mcore_to_hf.py`` exports as ``metarm_head.safetensors`` (docs/conversion.md).

The backbone stays a plain GPTModel (any family, Gemma-2's subclass included): for a MetaRM forward the
model is run with its ``post_process`` flag off, so Megatron-Core (0.16.1, ``GPTModel._postprocess``)
returns the decoder output instead of vocabulary logits; the language-model head is kept (and exported)
but not used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from megatron_grm.models.config import ModelConfig, check_checkpoint_model

HEAD_NAME = "metarm_head"


class MetaRMHead(torch.nn.Linear):
    """``Linear(hidden, 1)``: last-token hidden state → logit of P(judgment correct) (paper §4.2)."""

    def __init__(self, hidden_size: int, init_std: float, seed: int, dtype: torch.dtype) -> None:
        super().__init__(hidden_size, 1, bias=True, dtype=dtype)
        # Seeded from the run's seed alone, so every TP rank (and every DP replica) starts identical.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * init_std)
            self.bias.zero_()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Replicated over TP (no axis is split) and DP: every rank holds the whole head."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(keep_vars=True), prefix, {}, sharded_offsets)


def attach_metarm_head(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give a GPTModel its MetaRM head (on the last pipeline stage only); returns the same model.

    Attach it *after* loading GRM weights (a GRM checkpoint has no head) and *before* the Trainer wraps
    the model, so the optimizer sees the head's parameters.
    """
    gpt = unwrap(model)
    if has_metarm_head(gpt):
        raise ValueError("the model already has a MetaRM head")
    if gpt.post_process:
        config = gpt.config
        device = next(gpt.parameters()).device
        head = MetaRMHead(config.hidden_size, config.init_method_std, seed, config.params_dtype)
        setattr(gpt, HEAD_NAME, head.to(device))
    return model


def has_metarm_head(model: torch.nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), HEAD_NAME, None), MetaRMHead)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP (or other Megatron) wrapper."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


@contextlib.contextmanager
def _decoder_output_only(gpt: torch.nn.Module) -> Iterator[None]:
    """Make GPTModel.forward return the decoder output (final norm applied) instead of LM logits."""
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def metarm_forward(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last_index: torch.Tensor,
) -> torch.Tensor:
    """One logit per sequence, [b] in fp32, on the last pipeline stage; elsewhere the hidden states to send on.

    ``last_index[i]`` is the position of sequence i's last real token (batches are right-padded).
    """
    gpt = unwrap(model)
    with _decoder_output_only(gpt):
        hidden = model(tokens, position_ids, attention_mask)  # [s, b, h]
    if not gpt.post_process:
        return hidden
    if gpt.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # The head is replicated, so each TP rank's gradient is already the full one: split, don't reduce.
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    last = hidden[last_index.to(hidden.device), torch.arange(hidden.shape[1], device=hidden.device)]
    return getattr(gpt, HEAD_NAME)(last).squeeze(-1).float()


# ------------------------------------------------------------------------------------------ checkpoints
def checkpoint_has_metarm_head(folder: str) -> bool:
    from megatron.core import dist_checkpointing

    return f"{HEAD_NAME}.weight" in dist_checkpointing.load_tensors_metadata(folder)


def load_model_weights(model: torch.nn.Module, path: str, model_cfg: ModelConfig | None = None) -> str:
    """Load a checkpoint's model weights (any TP/PP layout) into a bare model; returns the folder.

    Tensors the model does not have are ignored, so a GRM loads from a MetaRM checkpoint too. A model
    with a MetaRM head needs a checkpoint that has one. With ``model_cfg`` (what the model was built
    from) a checkpoint saved for other function-only settings (RoPE base, norm epsilon, ...) is refused.
    """
    from megatron_grm.train.checkpoint import checkpoint_folder, load_checkpoint

    folder = checkpoint_folder(path)
    if model_cfg is not None:
        check_checkpoint_model(folder, model_cfg)
    if has_metarm_head(model) and not checkpoint_has_metarm_head(folder):
        raise ValueError(f"{folder} has no MetaRM head ({HEAD_NAME}.*): train one with megatron_grm.stages.metarm")
    loaded = load_checkpoint(folder, {"model": unwrap(model).sharded_state_dict()})
    unwrap(model).load_state_dict(loaded["model"])
    return folder


# ------------------------------------------------------------------------------------------ inputs and batches
def metarm_input_ids(tokenizer, prompt: str, judgment: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of the MetaRM input for one judgment, and whether they had to be cut to ``max_tokens``.

    ``prompt`` is the GRM prompt the judgment answered (as shown, chat formatting included). The whole
    input is data the MetaRM reads, so special-token strings in it (the chat template's included) are
    encoded as text: a judged response cannot end or restart the input; a BOS the template writes is the
    BOS token, not its spelling. Too long an input keeps its *end*
    (the judgment and the question), behind the BOS token when the family uses one.
    """
    from megatron_grm.spct import metarm_prompt

    if tokenizer.uses_bos:  # a template that writes BOS (Gemma, Llama-3): the BOS id stands for it, once
        bos_text = tokenizer.decode([tokenizer.bos_id])
        if bos_text and prompt.startswith(bos_text):
            prompt = prompt[len(bos_text):]
    ids = tokenizer.encode(metarm_prompt(prompt, judgment), add_bos=tokenizer.uses_bos, literal=True)
    if len(ids) <= max_tokens:
        return ids, False
    head = ids[:1] if tokenizer.uses_bos and ids[:1] == [tokenizer.bos_id] else []
    return head + ids[len(ids) - (max_tokens - len(head)):], True


def collate_metarm(items: Sequence[tuple[Sequence[int], Sequence[float]]], seq_length: int | None = None,
                   pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A MetaRM micro-batch from ``(token ids, [label])`` items: the trainer's padded batch contract
    (docs in :mod:`megatron_grm.data.packing`) plus ``last_index`` and the 0/1 target ``correct``."""
    from megatron_grm.data.packing import collate_padded

    batch = collate_padded([(ids, [0] * len(ids)) for ids, _ in items], seq_length=seq_length, pad_id=pad_id)
    batch["last_index"] = torch.tensor([len(ids) - 1 for ids, _ in items], dtype=torch.long)
    batch["correct"] = torch.tensor([float(label[0]) for _, label in items], dtype=torch.float32)
    return batch


# ------------------------------------------------------------------------------------------ scoring
# Micro-batches per forward-only schedule call: with one, a pipeline's stages take turns (with PP = 2 half
# of each replica's GPUs idle); with m of them the 1F1B bubble is (PP - 1) / (m + PP - 1).
MICRO_BATCHES_PER_CALL = 8


@torch.no_grad()
def metarm_logits(model: torch.nn.Module, sequences: Sequence[Sequence[int]], micro_batch_size: int,
                  pad_id: int, micro_batches_per_call: int = MICRO_BATCHES_PER_CALL) -> list[float]:
    """The MetaRM logit of every token sequence, returned on every rank.

    Collective over the world: every rank passes the same list. Data-parallel replicas score disjoint
    shards; pipeline stages run Megatron's forward-only schedule over up to ``micro_batches_per_call``
    micro-batches of similar lengths at a time, and the last stage's logits are broadcast.
    """
    from megatron.core import parallel_state

    distributed = torch.distributed.is_initialized()
    dp_rank = parallel_state.get_data_parallel_rank() if distributed else 0
    dp_size = parallel_state.get_data_parallel_world_size() if distributed else 1
    mine = list(range(dp_rank, len(sequences), dp_size))
    # Similar lengths together, so little of each micro-batch is padding.
    mine.sort(key=lambda i: len(sequences[i]))
    batches = [mine[b:b + micro_batch_size] for b in range(0, len(mine), micro_batch_size)]
    calls = schedule_calls(batches, micro_batches_per_call)
    gpt = unwrap(model)
    was_training = gpt.training
    gpt.eval()
    scores: dict[int, float] = {}
    try:
        num_calls = len(calls)
        if distributed:  # every replica runs the same number of schedule calls (PP sends pair up)
            count = torch.tensor([num_calls])
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX,
                                         group=parallel_state.get_data_parallel_group())
            num_calls = int(count)
        for c in range(num_calls):
            group = calls[c] if c < len(calls) else []
            if group:
                logits = _forward_only(model, [[(sequences[i], [0.0]) for i in chunk] for chunk in group], pad_id)
                scores.update(zip([i for chunk in group for i in chunk], logits))
    finally:
        gpt.train(was_training)
    if distributed:
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            obj = [scores]
            torch.distributed.broadcast_object_list(
                obj, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
            scores = obj[0]
        gathered: list[Any] = [None] * dp_size
        torch.distributed.all_gather_object(gathered, scores, group=parallel_state.get_data_parallel_group())
        scores = {i: s for part in gathered for i, s in part.items()}
    return [scores[i] for i in range(len(sequences))]


def schedule_calls(batches: list[list[int]], per_call: int) -> list[list[list[int]]]:
    """Consecutive micro-batches in groups of up to ``per_call``; the pipeline sends one tensor shape per
    call, so a shorter last micro-batch gets a call of its own."""
    if per_call < 1:
        raise ValueError(f"micro_batches_per_call={per_call}; must be >= 1")
    calls: list[list[list[int]]] = []
    for batch in batches:
        if calls and len(calls[-1]) < per_call and len(calls[-1][0]) == len(batch):
            calls[-1].append(batch)
        else:
            calls.append([batch])
    return calls


def _forward_only(model: torch.nn.Module, microbatches: list[list[tuple[Sequence[int], list[float]]]],
                  pad_id: int) -> list[float]:
    """One forward-only pass of Megatron's schedule over equally sized micro-batches, padded to one length;
    logits on the last stage, in micro-batch order."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # Padded to a multiple of 64: sequence parallelism splits the sequence over TP ranks.
    longest = max(len(ids) for items in microbatches for ids, _ in items)
    length = -(-longest // 64) * 64
    batches = [collate_metarm(items, seq_length=length, pad_id=pad_id) for items in microbatches]
    collected: list[float] = []

    def forward_step(data_iterator, chunk):
        from megatron_grm.parallel.device import to_device

        b = to_device(next(data_iterator))
        output = metarm_forward(chunk, b["tokens"], b["position_ids"], b["attention_mask"], b["last_index"])

        def collect(out: torch.Tensor):
            collected.extend(out.tolist())
            zero = out.sum() * 0
            return zero, torch.tensor(1, dtype=torch.int), {}

        return output, collect

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=length, micro_batch_size=batches[0]["tokens"].shape[0], forward_only=True,
    )
    return collected
