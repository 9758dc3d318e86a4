"""A real Slurm cluster on localhost for the tests: munged + slurmctld + slurmd as root, all under one folder.

Follows ``shared/notes/local-slurm.md`` (measured on this machine, Slurm 22.05). Two flavours:

* :meth:`LocalSlurm.start_compute` — one node (``localhost``, this machine's CPUs and memory), munged,
  slurmctld and slurmd: jobs really run.
* :meth:`LocalSlurm.start_gpu_controller` — a second controller (its own ports and state) whose
  slurm.conf declares 16 fake 8-GPU A100 nodes and no slurmd: enough for ``sbatch --test-only`` to check
  that the production ``#SBATCH`` requests fit a 16 x 8 cluster. It shares the first cluster's munged.

Daemons are stopped by the PIDs this object started (TERM, then KILL after 10 s); nothing is killed by name.
Usable on its own for debugging: ``python tests/slurm/local_slurm.py /tmp/slurm`` starts a cluster and
prints the ``SLURM_CONF`` to export; Ctrl-C stops it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_grm.parallel.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_tools() -> list[str]:
    """Slurm/munge programs this harness needs that are not on PATH."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    needed = (*DAEMONS, "sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")
    return [tool for tool in needed if shutil.which(tool, path=path) is None]


def memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


@dataclass
class LocalSlurm:
    """One controller (+ optionally one slurmd) under ``root``; ``env`` is what clients need."""

    root: Path
    name: str = "local"
    pids: dict[str, int] = field(default_factory=dict)
    conf: Path | None = None
    munge_socket: Path | None = None

    # ------------------------------------------------------------------ start
    def start_compute(self) -> LocalSlurm:
        """munged + slurmctld + slurmd for one real node ``localhost``; returns once the node is idle."""
        self._folders()
        self.munge_socket = self._start_munged()
        cpus = os.cpu_count() or 1
        node = (f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={int(memory_mb() * 0.9)} "
                "State=UNKNOWN")
        self.conf = self._write_conf(node, "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP")
        self._start("slurmctld", ["slurmctld", "-f", str(self.conf), "-c"], self.root / "run" / "slurmctld.pid")
        self._start("slurmd", ["slurmd", "-f", str(self.conf), "-N", "localhost"], self.root / "run" / "slurmd.pid")
        self._wait_node_idle("localhost")
        return self

    def start_gpu_controller(self, munge_socket: Path, nodes: int = 16, gpus: int = 8) -> LocalSlurm:
        """A controller-only cluster of ``nodes`` fake DGX-A100 nodes (8 GPUs, 128 cores, 1 TiB each), and in
        partition ``cpu96`` as many 8-GPU nodes of 96 cores."""
        self._folders()
        self.munge_socket = munge_socket
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        for i in range(gpus):  # gres.conf needs File= entries; /dev/null symlinks are accepted (notes)
            link = devices / f"nvidia{i}"
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        (self.root / "gres.conf").write_text(f"Name=gpu Type=a100 File={devices}/nvidia[0-{gpus - 1}]\n")
        names = f"gpu[{1:03d}-{nodes:03d}]"
        node = (f"NodeName={names} NodeAddr=127.0.0.1 CPUs=128 Sockets=2 CoresPerSocket=64 ThreadsPerCore=1 "
                f"RealMemory=1000000 Gres=gpu:a100:{gpus} State=CLOUD")
        # The same GPUs on nodes of 96 CPUs (p4de.24xlarge, ND96amsr_A100_v4, a2-ultragpu-8g), partition "cpu96".
        names96 = f"p4d[{1:03d}-{nodes:03d}]"
        node96 = (f"NodeName={names96} NodeAddr=127.0.0.1 CPUs=96 Sockets=2 CoresPerSocket=48 ThreadsPerCore=1 "
                  f"RealMemory=1000000 Gres=gpu:a100:{gpus} State=CLOUD")
        self.conf = self._write_conf(
            f"{node}\n{node96}", f"PartitionName=gpu Nodes={names} Default=YES MaxTime=INFINITE State=UP\n"
            f"PartitionName=cpu96 Nodes={names96} MaxTime=INFINITE State=UP",
            # No slurmd answers for these nodes: declared as powered-down cloud nodes, the scheduler counts
            # them as available (it would "resume" them), which is what --test-only needs.
            extra=["GresTypes=gpu", "SuspendProgram=/bin/true", "ResumeProgram=/bin/true", "SuspendTime=3600",
                   "ResumeTimeout=3600"],
        )
        self._start("slurmctld", ["slurmctld", "-f", str(self.conf), "-c"], self.root / "run" / "slurmctld.pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.run(["sinfo", "-h", "-o", "%D"], check=False).returncode == 0:
                return self
            time.sleep(0.3)
        raise RuntimeError(f"slurmctld ({self.name}) did not answer:\n{self.log_tail('slurmctld')}")

    # ------------------------------------------------------------------ clients
    @property
    def env(self) -> dict[str, str]:
        assert self.conf is not None, "cluster not started"
        path = os.environ.get("PATH", "")
        if "/usr/sbin" not in path.split(":"):
            path = f"{path}:/usr/sbin:/sbin"
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def run(self, cmd: list[str], check: bool = True, env: dict[str, str] | None = None, cwd: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\S+?)=(\S*)", proc.stdout))

    def log_tail(self, daemon: str, lines: int = 40) -> str:
        path = self.root / "log" / f"{daemon}.log"
        if not path.exists():
            return f"({path} does not exist)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel every job, then TERM (and after 10 s KILL) the daemons this object started."""
        if self.conf is not None and "slurmctld" in self.pids:
            queued = self._queued()
            if queued:
                self.run(["scancel", *queued], check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self._queued():
                    time.sleep(0.5)
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(daemon, None)
            if pid is not None:
                _terminate(pid)

    # ------------------------------------------------------------------ internals
    def _queued(self) -> list[str]:
        return self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()

    def _folders(self) -> None:
        for sub in ("state", "spool", "run", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _start_munged(self) -> Path:
        munge = self.root / "munge"
        munge.chmod(0o755)  # munged refuses a socket folder others cannot reach
        key = munge / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = munge / "munge.socket"
        pid_file = self.root / "run" / "munged.pid"
        self._start("munged", ["munged", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={pid_file}", f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={munge / 'munge.seed'}"], pid_file)
        return sock

    def _write_conf(self, node_line: str, partition_line: str, extra: list[str] | None = None) -> Path:
        d = self.root
        lines = [
            f"ClusterName={self.name}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d}/log/jobcomp.txt",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",
            "MinJobAge=3600",
            # Schedule a submitted batch job at once, not up to 3 s later (Slurm's default delay, meant for
            # clusters taking many submissions a second): here each test job waited ~3 s in PENDING, idle.
            "SchedulerParameters=batch_sched_delay=0",
            *(extra or []),
            node_line,
            partition_line,
        ]
        conf = d / "slurm.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _start(self, daemon: str, cmd: list[str], pid_file: Path) -> None:
        """Run a daemon that forks into the background; remember the PID it writes."""
        pid_file.unlink(missing_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env_for_daemons(), timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{daemon} failed to start ({proc.returncode}): {proc.stderr}\n"
                               f"{self.log_tail(daemon)}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text().strip():
                self.pids[daemon] = int(pid_file.read_text().strip())
                return
            time.sleep(0.1)
        raise RuntimeError(f"{daemon} wrote no pid file {pid_file}:\n{self.log_tail(daemon)}")

    def env_for_daemons(self) -> dict[str, str]:
        path = os.environ.get("PATH", "")
        return {**os.environ, "PATH": f"{path}:/usr/sbin:/sbin"}

    def _wait_node_idle(self, node: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["sinfo", "-h", "-n", node, "-o", "%T"], check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"node {node} is {state!r}, not idle, after {timeout} s:\n{self.log_tail('slurmd')}\n"
                           f"{self.log_tail('slurmctld')}")


def _terminate(pid: int, grace: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone; it is reaped here when it is our child)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/grm-slurm")
    cluster = LocalSlurm(folder).start_compute()
    gpu = LocalSlurm(folder / "gpu16", name="gpu16").start_gpu_controller(cluster.munge_socket)
    print(f"export SLURM_CONF={cluster.conf}   # 1 CPU node\nexport SLURM_CONF={gpu.conf}   # 16 x 8 A100 (fake)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # TERM stops the daemons too
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        gpu.stop()
        cluster.stop()
