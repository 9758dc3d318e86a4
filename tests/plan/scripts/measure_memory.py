"""Run a few real training steps and measure the bytes the planner predicts (run under torchrun).

    torchrun --nproc-per-node 2 tests/plan/scripts/measure_memory.py --variants variants.json --out out.json

Per variant (precision, recompute, distributed optimizer) it builds the Trainer, takes ``--steps`` steps
of synthetic data, and reports on rank 0:
- ``weights`` / ``gradients`` / ``optimizer``: storage bytes of the model parameters, of their
  ``main_grad`` buffers, and of whatever else the optimizer holds (Adam moments, fp32 master copies);
- ``activations``: the peak over the step of the bytes autograd keeps for backward, counted once per
  storage through ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded), which includes
  what full recompute re-materialises during backward.
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from train_step import synthetic_batch  # noqa: E402

from megatron_grm.stages.common import prepare_run  # noqa: E402
from megatron_grm.stages.sft import SupervisedObjective  # noqa: E402
from megatron_grm.train.loop import Trainer  # noqa: E402


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Live bytes of tensors saved for backward, per storage, with their peak."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, references]
        self.current = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in self.exclude or size == 0:
            return tensor
        entry = self.live.setdefault(ptr, [size, 0])
        if entry[1] == 0:
            self.current += size
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        held = _Held(tensor)
        weakref.finalize(held, self._release, ptr)
        return held

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def state_bytes(trainer: Trainer) -> dict[str, int]:
    params = storages(trainer.model.module.parameters())
    grads = storages(getattr(p, "main_grad", None) for p in trainer.model.module.parameters())
    held = []
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = opt.optimizer
        held += [p for group in inner.param_groups for p in group["params"]]
        held += [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    optimizer = {k: v for k, v in storages(held).items() if k not in params and k not in grads}
    return {"weights": sum(params.values()), "gradients": sum(grads.values()), "optimizer": sum(optimizer.values())}


def measure(cfg: dict, steps: int) -> dict[str, int]:
    run = prepare_run(cfg)
    trainer = Trainer(run)
    t, m = run.trainer, run.model
    microbatches = t.global_batch_size // (t.micro_batch_size * torch.distributed.get_world_size())
    objective = SupervisedObjective()
    rank = torch.distributed.get_rank()
    peak = 0
    for step in range(steps):
        batches = [synthetic_batch(m.vocab_size, t.micro_batch_size, t.seq_length, seed=100 * step + 10 * rank + i,
                                   device=torch.device("cpu")) for i in range(microbatches)]
        meter = SavedTensorMeter(set(storages(trainer.model.module.parameters())))
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            trainer.train_step(batches, objective)
        peak = max(peak, meter.peak)
    return {**state_bytes(trainer), "activations": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", required=True, help="JSON list of config dicts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    results = []
    for cfg in json.loads(Path(args.variants).read_text()):
        results.append(measure(cfg, args.steps))
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
    from megatron_grm.parallel import destroy_parallel

    destroy_parallel()  # gloo's threads still alive at interpreter exit can abort the process (SIGABRT)
