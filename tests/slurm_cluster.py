"""A real two-node SLURM cluster on this one machine, for tests: munged, slurmctld and two
slurmd (``slurmd -N node1``, ``-N node2``, each on its own port), all from the installed
packages (Debian's slurm-wlm and munge; ``make slurm`` installs them), with their key, sockets,
state, spool and logs in a temp dir and non-default ports, so nothing of the machine's own
SLURM or munge (if any) is used or touched.

The daemons run in the foreground (``-D``, ``-F``) as children of the test process: their pids
are known, and :meth:`SlurmCluster.stop` ends each of them by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.launch import free_port

NODES = ("node1", "node2")
PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")

SLURM_CONF = """\
ClusterName=cmrtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MinJobAge=10
KillWait=3
SlurmdTimeout=10
InactiveLimit=0
{nodes}
PartitionName=cpu Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""
# One CPU per node: the two nodes share this machine's cores, and a job's OMP_NUM_THREADS
# (from the CPUs SLURM grants) is then 1, as in the plain `accelerate launch` runs it is
# compared with.
NODE_LINE = "NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} CPUs=1 RealMemory=1000"


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Start with :meth:`start`, end with :meth:`stop`; :attr:`env` is the environment the SLURM
    commands (sbatch, scontrol, ...) need to talk to this cluster."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.daemons: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> None:
        for sub in ("munge", "state", "spool/node1", "spool/node2"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        nodes = "\n".join(NODE_LINE.format(name=n, port=free_port()) for n in NODES)
        self.conf.write_text(SLURM_CONF.format(
            root=self.root, ctld_port=free_port(), munge_socket=self.munge_socket, nodes=nodes,
            node_list=",".join(NODES)))
        self._spawn("slurmctld", [daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for name in NODES:
            self._spawn(f"slurmd-{name}", [daemon("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
        self.wait_idle(timeout)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run([daemon("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        self._spawn("munged", [daemon("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root}/munge/munged.pid",
                               f"--log-file={self.root}/munge/munged.log",
                               f"--seed-file={self.root}/munge/munged.seed"])
        self._wait(lambda: self.munge_socket.exists(), 20, "munged's socket")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        # Their own session: a ^C or a signal to the test's process group does not reach them.
        self.daemons[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                              start_new_session=True)
        log.close()

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            for name, process in self.daemons.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}) before {what}:\n" + self.logs())
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n" + self.logs())

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until ``sinfo`` shows every node idle (a job that just ended leaves them completing)."""
        self._wait(lambda: self.node_states() == {n: "idle" for n in NODES}, timeout, "both nodes idle in sinfo")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
        return result

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id."""
        result = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (empty once the job has left slurmctld's memory)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float = 240) -> dict[str, str]:
        found: dict[str, str] = {}

        def in_state():
            found.update(self.job(job_id))
            return found.get("JobState") in states
        self._wait(in_state, timeout, f"job {job_id} in {states} (last {found.get('JobState')})")
        return found

    def start_requeued_now(self, job_id: str, *updates: str, timeout: float = 120) -> None:
        """SLURM holds a requeued job back for two minutes (its BeginTime, Reason=BeginTime):
        once the job is back in the queue, make it eligible now, so a test need not wait.
        ``updates``: more ``scontrol update`` fields for the held job (``TimeLimit=10``)."""
        self._wait(lambda: self.job(job_id).get("Reason") == "BeginTime", timeout, f"job {job_id} requeued")
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", *updates)

    def kill_slurmd(self, node: str) -> None:
        """A lost node: its slurmd dies (its tasks are the caller's to kill)."""
        process = self.daemons.pop(f"slurmd-{node}")
        process.kill()
        process.wait()

    def start_slurmd(self, node: str) -> None:
        """A lost node comes back (ReturnToService=2 makes it usable again)."""
        self._spawn(f"slurmd-{node}", [daemon("slurmd"), "-D", "-N", node, "-f", str(self.conf)])

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """End every daemon this cluster started, by pid: slurmd first, munged last."""
        for name in sorted(self.daemons, key=lambda n: (n == "munged", n == "slurmctld")):
            process = self.daemons[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.daemons.clear()
