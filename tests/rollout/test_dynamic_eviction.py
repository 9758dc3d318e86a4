"""An evicted request of Megatron-Core's dynamic engine keeps its stop words (the GPU run of
tests/rollout/test_dynamic_engine_gpu.py evicts for real; this checks the hand-back on Megatron's own
request records, which need no GPU)."""

from __future__ import annotations

import torch

from megatron_grm.rollout.dynamic_backend import keep_stop_words


def test_an_evicted_request_gets_its_stop_words_back():
    from megatron.core.inference.inference_request import DynamicInferenceRequest, DynamicInferenceRequestRecord
    from megatron.core.inference.sampling_params import SamplingParams

    request = DynamicInferenceRequest(request_id=7, prompt_tokens=torch.tensor([1, 2, 3]),
                                      sampling_params=SamplingParams(num_tokens_to_generate=8))
    stop_words = [[42], [5, 6]]
    request.stop_word_ids = stop_words
    request.generated_tokens = [9, 10]
    record = DynamicInferenceRequestRecord.from_request(request)
    record.checkpoint()  # what the engine does on eviction: prompt + tokens so far, as a new request
    assert record[-1].prompt_tokens.tolist() == [1, 2, 3, 9, 10]
    assert not record[-1].stop_word_ids  # Megatron-Core drops them: the reason for keep_stop_words
    assert keep_stop_words({7: record}, {7: stop_words}) == 1
    assert record[-1].stop_word_ids == stop_words
    assert keep_stop_words({7: record}, {7: stop_words}) == 0  # already there: nothing to give back
    assert record[0].stop_word_ids == stop_words
