"""Resume Megatron-Core's distributed optimizer when its inner optimizer is torch's Adam.

Without Transformer Engine or apex (every CPU run, and a GPU install without either) Megatron-Core
0.16.1 takes its "non-Apex/TE" branches of ``DistributedOptimizer``, two of which break a resume:

- ``_set_main_param_and_optimizer_states`` copies every key of torch Adam's per-param state, which holds
  ``step``; the reshardable checkpoint formats store only param/exp_avg/exp_avg_sq (``step`` travels in
  the param groups and is restored by ``load_state_dict`` just before), so the copy raises KeyError.
- ``load_state_dict`` gives every param's state the *same* ``step`` tensor; torch Adam increments it in
  place once per param, so after a resume the bias correction is wrong.

The fix depends on which optimizer Megatron built, not on the device, so :func:`install` keys on
Megatron's own ``HAVE_APEX_OR_TE``.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_INSTALLED = False


def install() -> bool:
    """Patch the two methods once per process when Megatron falls back to torch Adam; True if patched."""
    global _INSTALLED
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    if _INSTALLED:
        return True
    real_set = DistributedOptimizer._set_main_param_and_optimizer_states
    real_load = DistributedOptimizer.load_state_dict

    def _set_states_present(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return real_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    def _load_with_private_steps(self, state_dict):
        real_load(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_present
    DistributedOptimizer.load_state_dict = _load_with_private_steps
    _INSTALLED = True
    log.info("Megatron's distributed optimizer runs torch Adam (no TE/apex): resume fixes installed")
    return True
