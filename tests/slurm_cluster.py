"""A real one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd with all state in a temp dir.

Debian's `slurm-wlm` and `munge` packages provide the daemons (`apt-get install --no-install-recommends slurm-wlm
munge`; .ci/run installs them). The daemons run as root (SlurmUser=root), on free ports, with their own munge socket
and key, so two clusters (two pytest-xdist workers) do not meet, and nothing under /etc is touched. Client commands
(sbatch, scontrol, srun inside jobs) find this cluster through SLURM_CONF, which `SlurmCluster.env` provides.

Settings that keep requeue tests short: `AuthInfo=cred_expire=10` (a requeued job waits cred_expire + 1 s before it
runs again, ~165 s with Slurm's default) and `SchedulerParameters=sched_interval=2`; `KillWait=5` so ranks that
ignore SIGTERM are killed quickly.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "squeue", "scancel")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
INSTALL_HINT = "install it as root with `apt-get install --no-install-recommends slurm-wlm munge`"


class SlurmUnavailable(RuntimeError):
    """The cluster cannot start here; the message says why and how to enable it."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


class SlurmCluster:
    """Start with `SlurmCluster.start(cpus)`, stop with `stop()`; `env` is the environment for client commands."""

    def __init__(self, root: Path, cpus: int) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, cpus: int = 2, timeout_s: float = 30.0) -> SlurmCluster:
        missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            raise SlurmUnavailable(f"Slurm is not installed (missing {', '.join(missing)}): {INSTALL_HINT}")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting munged, slurmctld and slurmd as SlurmUser=root needs root: run the "
                                   "tests as root (CI does)")
        cluster = cls(Path(tempfile.mkdtemp(prefix="dinocell-slurm-")), cpus)
        try:
            cluster._start_munge()
            cluster._write_conf()
            cluster._start_slurm(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _daemon(self, *command: str) -> subprocess.Popen:
        binary = shutil.which(command[0]) or f"/usr/sbin/{command[0]}"
        process = subprocess.Popen([binary, *command[1:]], env=self.env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._daemon("munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                     f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                     f"--seed-file={munge / 'munged.seed'}")
        self._wait(lambda: self.munge_socket.exists(), 10, "munged", munge / "munged.log")

    def _write_conf(self) -> None:
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir()
        log = self.root / "log"
        self.conf.write_text(f"""\
ClusterName=dinocell-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root / "slurmd.pid"}
SlurmctldLogFile={log / "slurmctld.log"}
SlurmdLogFile={log / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_slurm(self, timeout_s: float) -> None:
        self._daemon("slurmctld", "-D", "-f", str(self.conf))
        self._wait(lambda: self._scontrol("ping").returncode == 0, timeout_s, "slurmctld",
                   self.root / "log" / "slurmctld.log")
        self._daemon("slurmd", "-D", "-N", self.node, "-f", str(self.conf))

        def node_idle() -> bool:
            state = self._scontrol("show", "node", self.node).stdout
            return "State=IDLE" in state

        self._wait(node_idle, timeout_s, "slurmd", self.root / "log" / "slurmd.log")

    def _scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30)

    def _squeue(self) -> list[str]:
        out = subprocess.run(["squeue", "--noheader", "--format=%i"], env=self.env, capture_output=True, text=True,
                             timeout=30)
        return out.stdout.split()

    def _wait(self, ready, timeout_s: float, what: str, log: Path) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            exited = [p.args[0] for p in self.processes if p.poll() is not None]
            if exited or time.monotonic() > deadline:
                why = f"exited ({', '.join(exited)})" if exited else f"not ready after {timeout_s:.0f} s"
                raise SlurmUnavailable(f"{what} did not start: {why}. Last lines of {log}:\n{_tail(log)}")
            time.sleep(0.2)

    def wait(self, job_id: str, timeout_s: float) -> str:
        """Wait until the job has ended (a requeued job runs again first); returns its final JobState."""
        deadline = time.monotonic() + timeout_s
        while (state := self.job_state(job_id)) not in ENDED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f} s")
            time.sleep(0.5)
        return state

    def job_field(self, job_id: str, name: str) -> str:
        """One `Name=value` field of `scontrol show job`, e.g. Restarts."""
        out = self._scontrol("show", "job", job_id).stdout
        return next((f.split("=", 1)[1] for f in out.split() if f.startswith(f"{name}=")), "")

    def job_state(self, job_id: str) -> str:
        """JobState of a job slurmctld still knows (MinJobAge=300 s after it ended), e.g. RUNNING, COMPLETED."""
        return self.job_field(job_id, "JobState") or "UNKNOWN"

    def stop(self) -> None:
        """Cancel what still runs (job steps outlive slurmd), stop the daemons and delete the temp dir."""
        if self.processes and self.processes[-1].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._squeue():
                time.sleep(0.5)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
