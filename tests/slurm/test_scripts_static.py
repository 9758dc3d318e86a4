"""The launch scripts as files: they parse, shellcheck is clean, and the production requests fit 16 x 8 A100."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .harness import PROGRAMS, REPO, SCRIPTS, SLURM_DIR, clean_env

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

GPU_STAGES = ("sft", "rft", "grpo", "metarm", "eval")


def shell_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in [*SLURM_DIR.glob("*.sh"), *PROGRAMS.glob("*.sh")])


def sbatch_directives(script: str) -> dict[str, str]:
    directives = {}
    for line in (SLURM_DIR / script).read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            directives[m.group(1)] = m.group(2) or ""
    return directives


def test_every_stage_has_an_executable_script():
    for name in SCRIPTS:
        path = SLURM_DIR / f"{name}.sh"
        assert path.is_file(), f"{path} is missing"
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        assert path.read_text().startswith("#!/bin/bash\n")
        assert 'source "$GRM_REPO/slurm/common.sh"' in path.read_text(), f"{path} does not use slurm/common.sh"


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_script_that_cannot_find_its_checkout_says_so(name, tmp_path):
    # Outside a job, with GRM_REPO pointing nowhere: the message names the fix instead of a bare `source` error.
    proc = subprocess.run(["bash", str(SLURM_DIR / f"{name}.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={**clean_env(), "GRM_REPO": str(tmp_path / "nowhere")}, timeout=30)
    assert proc.returncode == 1
    assert f"no slurm/common.sh under GRM_REPO={tmp_path / 'nowhere'}" in proc.stderr
    assert "export GRM_REPO=<the checkout>" in proc.stderr


def test_bash_parses_every_script():
    for rel in shell_files():
        proc = subprocess.run(["bash", "-n", rel], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"bash -n {rel}: {proc.stderr}"


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck (CI does this in .ci/run)")
    files = shell_files()
    assert "slurm/common.sh" in files and len(files) >= 7
    proc = subprocess.run(["shellcheck", "-x", "--severity=info", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_training_scripts_request_16_nodes_of_8_gpus_with_a_warning_signal(stage):
    d = sbatch_directives(f"{stage}.sh")
    assert d["nodes"] == "16" and d["ntasks-per-node"] == "8" and d["gpus-per-node"] == "8"
    assert re.fullmatch(r"USR1@\d+", d["signal"]), "the warning must reach the ranks (no B:)"
    assert int(d["signal"].split("@")[1]) >= 300, "leave a 27B distributed checkpoint time to finish"
    assert "requeue" in d and d["open-mode"] == "append"


def _test_only(gpu_slurm, script: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**clean_env(), "SLURM_CONF": str(gpu_slurm.conf), "PATH": gpu_slurm.env["PATH"]}
    return subprocess.run(["sbatch", "--test-only", *extra, str(SLURM_DIR / script)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_sbatch_test_only_accepts_the_16_node_request(gpu_slurm, stage):
    proc = _test_only(gpu_slurm, f"{stage}.sh")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # 16 exclusive nodes of 128 cores each.
    m = re.search(r"to start at \S+ using (\d+) processors on nodes (\S+)", out)
    assert m, out
    assert m.group(2) == "gpu[001-016]" and int(m.group(1)) == 16 * 128, out


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_sbatch_test_only_accepts_the_16_node_request_on_nodes_of_96_cpus(gpu_slurm, stage):
    """8 x A100 nodes with 96 CPUs (p4de, ND96amsr, a2-ultragpu-8g): the scripts ask for whole nodes, not for
    8 tasks x 16 CPUs, which such a node cannot give."""
    assert "cpus-per-task" not in sbatch_directives(f"{stage}.sh")
    proc = _test_only(gpu_slurm, f"{stage}.sh", "--partition=cpu96")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    m = re.search(r"to start at \S+ using (\d+) processors on nodes (\S+)", out)
    assert m and m.group(2) == "p4d[001-016]" and int(m.group(1)) == 16 * 96, out
    # What the header used to ask for does not fit there.
    old = _test_only(gpu_slurm, f"{stage}.sh", "--partition=cpu96", "--cpus-per-task=16")
    assert old.returncode != 0, old.stdout + old.stderr


def test_sbatch_test_only_accepts_the_convert_request(gpu_slurm):
    proc = _test_only(gpu_slurm, "convert.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"using \d+ processors on nodes gpu\d{3} ", proc.stderr), proc.stderr


def test_the_fake_a100_cluster_rejects_what_does_not_fit(gpu_slurm):
    """The 16-node acceptance above means something: one node more, or a ninth GPU, is refused."""
    too_many_nodes = _test_only(gpu_slurm, "grpo.sh", "--nodes=17")
    assert too_many_nodes.returncode != 0 and "not available" in too_many_nodes.stderr, too_many_nodes.stderr
    too_many_gpus = _test_only(gpu_slurm, "grpo.sh", "--gpus-per-node=9")
    assert too_many_gpus.returncode != 0, too_many_gpus.stderr


@pytest.mark.parametrize("folder", ["/scratch/runs/lr=1e-6,bs(8)", "/scratch/a${x}/b", "/scratch/it's/run", "/plain"])
def test_the_run_folder_the_script_adds_reaches_hydra_literally(folder):
    """The script appends trainer.run_dir=<its folder>; bare, a folder named like lr=1e-6,bs(8) was
    override syntax to Hydra and every rank died after the 128 GPUs were allocated."""
    from megatron_grm.stages.common import load_config

    proc = subprocess.run(["bash", "-c", 'source slurm/common.sh && grm_hydra_literal "$1"', "_", folder],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert load_config("sft", [f"trainer.run_dir={proc.stdout}"])["trainer"]["run_dir"] == folder
