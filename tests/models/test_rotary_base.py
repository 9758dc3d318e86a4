"""A RoPE base that is not an integer reaches Megatron's rotary embedding as it is, not truncated."""

from __future__ import annotations

import torch

from tests.conftest import python_json

BUILD = """
import json
from megatron_grm.models.config import ModelConfig
from megatron_grm.models.precision import PrecisionConfig
from megatron_grm.models.provider import build_model
from megatron_grm.parallel.distributed import ParallelLayout, init_parallel
init_parallel(ParallelLayout())
cfg = ModelConfig(family="llama", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  vocab_size=128, max_position_embeddings=64, rotary_base=10.5)
model = build_model(cfg, ParallelLayout(), PrecisionConfig(), use_te=False)
print(json.dumps(model.rotary_pos_emb.inv_freq.tolist()))
"""


def test_non_integer_rotary_base_gives_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ours = torch.tensor(python_json(BUILD), dtype=torch.float32)

    def hf_inv_freq(base: float) -> torch.Tensor:
        config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default",
                                                                                       "rope_theta": base})
        return LlamaRotaryEmbedding(config).inv_freq

    assert not torch.equal(hf_inv_freq(10.5), hf_inv_freq(10.0))  # what truncating the base would give
    assert torch.equal(ours, hf_inv_freq(10.5))
