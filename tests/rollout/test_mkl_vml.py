"""parallel/mkl_vml.py: oneMKL's vector-math kernels chosen on one thread before torch's intra-op threads call
them together (pytorch/pytorch#188792), so a process's first ``cos`` (a rollout's first RoPE table) is as
accurate as every later one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_grm.parallel import mkl_vml
from tests.conftest import REPO, REPO_PYTHONPATH

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without MKL")

# A fresh process as a rollout's begins (torch with 2 intra-op threads, Megatron-Core and transformers loaded),
# whose first cos (over [1456, 64] angles of up to ~2,900 rad, a RoPE table's) follows an MKL GEMM, checked
# against numpy's float64 cos. Without the warm-up 2 of 8 such processes returned ~45,800 of the 93,184
# entries wrong, one thread's chunk (the project's AVX-512 Xeon, session 53), so 6 trials catch a missing
# warm-up ~5 times in 6; the rollout itself met it in about every second process.
FIRST_COS = """
import json, sys, numpy, torch
torch.set_num_threads(2)
import megatron.core, transformers  # noqa: F401 (what a rollout process holds)
from megatron_grm.parallel import mkl_vml
warmed = mkl_vml.resolve_vml_dispatch() if sys.argv[1] == "warm" else False
angles = (torch.arange(1456, dtype=torch.float32)[:, None] * torch.rand(64)[None, :] * 2).contiguous()
exact = torch.from_numpy(numpy.cos(angles.double().numpy())).float()
a, b = torch.randn(512, 512), torch.randn(512, 512)
a @ b  # MKL's threads just busy: the cos's two chunks start together
got = torch.cos(angles)
print(json.dumps({"warmed": warmed, "wrong": int(((got - exact).abs() > 1e-6).sum())}))
"""


class _Calls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if args and isinstance(args[0], torch.Tensor):
            self.seen.append((getattr(func, "__name__", str(func)), args[0].dtype, args[0].numel()))
        return func(*args, **(kwargs or {}))


def test_every_vml_op_runs_once_per_dtype_on_one_element_and_only_once_per_process(monkeypatch):
    monkeypatch.setattr(mkl_vml, "_resolved", False)
    with _Calls() as calls:
        assert mkl_vml.resolve_vml_dispatch()
    ops = {(name, dtype) for name, dtype, numel in calls.seen if numel == 1}
    for dtype in (torch.float32, torch.float64):
        assert {name for name, d in ops if d == dtype} >= set(mkl_vml.VML_OPS)
    assert not [c for c in calls.seen if c[2] != 1]  # one element: the calling thread alone
    with _Calls() as again:
        assert mkl_vml.resolve_vml_dispatch()
    assert again.seen == []


def test_a_fresh_processs_first_cos_is_accurate_after_the_warmup():
    env = {"PYTHONPATH": REPO_PYTHONPATH, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    results = []
    for _ in range(6):  # the race is per process: each trial is a fresh one
        proc = subprocess.run([sys.executable, "-c", FIRST_COS, "warm"], capture_output=True, text=True,
                              timeout=180, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert all(r["warmed"] for r in results)
    assert [r["wrong"] for r in results] == [0] * len(results), results

