"""parallel/lazy_compile.py: Megatron-Core imports without TorchDynamo, whichever module imports it first; its
fused kernels still compile, with their own options, at their first call."""

from __future__ import annotations

import subprocess
import sys

from megatron_grm.parallel.lazy_compile import lazy_compile
from tests.conftest import REPO, REPO_PYTHONPATH


def run_python(code: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": REPO_PYTHONPATH, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_whichever_module_imports_megatron_core_first_it_imports_without_torchdynamo():
    """``import megatron_grm`` installs the hook; the parallel package itself loads nothing heavy, and the
    first importer here is a data module (as in the RFT stage, which paid for TorchDynamo in every rank)."""
    code = ("import importlib.resources, sys, megatron_grm, megatron_grm.parallel; "
            "print('megatron.core' in sys.modules); "
            "from megatron.core.datasets import helpers_cpp; "
            "from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl; "
            "from megatron.core.jit import jit_fuser; from megatron_grm.parallel import init_parallel; "
            "print('megatron.core' in sys.modules, 'torch._dynamo' in sys.modules, jit_fuser.__qualname__, "
            "init_parallel.__module__, any('MegatronCore' in type(f).__name__ for f in sys.meta_path), "
            "sys.modules['megatron.core'].__spec__.loader.is_package('megatron.core'), "
            "importlib.resources.files('megatron.core').joinpath('__init__.py').is_file())")
    assert run_python(code) == ["False", "True", "False", "lazy_compile.<locals>.compile_later",
                                "megatron_grm.parallel.distributed", "False", "True", "True"]


def test_a_deferred_function_is_compiled_once_at_its_first_call_with_its_options():
    compiled: list[tuple[object, dict]] = []

    def real_compile(fn, **options):
        compiled.append((fn, options))
        return lambda *args, **kwargs: ("compiled", fn(*args, **kwargs))

    def add(x, y=1):
        return x + y

    deferred = lazy_compile(real_compile)
    plain = deferred(add)
    decorated = deferred(fullgraph=True)(add)  # the @torch.compile(...) form
    assert compiled == [] and plain.__name__ == "add"
    assert plain(2, y=3) == ("compiled", 5) and plain(1) == ("compiled", 2)
    assert decorated(4) == ("compiled", 5)
    assert compiled == [(add, {}), (add, {"fullgraph": True})]


def test_stage_and_preprocessing_entry_points_import_megatron_core_lazily():
    # The RFT stage first: it imports Megatron-Core's datasets before anything else of Megatron's.
    modules = ["megatron_grm.stages.rft", "megatron_grm.stages.bootstrap", "megatron_grm.stages.sft",
               "megatron_grm.stages.grpo", "megatron_grm.stages.metarm", "megatron_grm.stages.evaluate",
               "megatron_grm.models.hf_convert", "megatron_grm.data.preprocess"]
    code = f"import sys, {', '.join(modules)}; print('torch._dynamo' in sys.modules)"
    assert run_python(code) == ["False"]
