"""A throw-away single-node Slurm cluster for the launcher tests: munged, slurmctld and slurmd started as children of
the test run (this host only, own ports, sockets, state and pid files under one temporary folder), stopped by pid.

Needs Debian's `slurmctld slurmd munge slurm-client` (tests/install_slurm.sh installs them when run as root with
apt); without them `start_cluster` raises `SlurmUnavailable` and the tests skip, saying how to enable them.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "sbatch", "scontrol", "scancel", "squeue", "srun")
ENABLE = ("Slurm tests need munged, slurmctld, slurmd and the Slurm clients: as root on Debian/Ubuntu run "
          "`bash tests/install_slurm.sh` (tests/run.sh does it), or apt-get install slurmctld slurmd munge "
          "slurm-client")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """The Slurm daemons or clients are not installed (or cannot run here)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_line() -> str:
    """This host as slurmd sees it (`slurmd -C`: name, CPUs, sockets/cores/threads, RealMemory)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), None)
    if line is None:
        raise SlurmUnavailable(f"`slurmd -C` printed no NodeName line: {out!r}")
    return line


DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")

@dataclass
class SlurmCluster:
    """A running test cluster: `env` points the Slurm clients at it (SLURM_CONF)."""

    root: Path
    conf: Path
    node: str
    cpus: int
    version: str
    procs: dict = field(default_factory=dict)

    @property
    def env(self) -> dict:
        """os.environ plus SLURM_CONF of this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        kw.setdefault("env", self.env)
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=kw.pop("timeout", 60), **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        """Submit; returns the job id."""
        # a job gets its rendezvous from train.sbatch, not from what an in-process test group left in this process
        base = {k: v for k, v in (env or os.environ).items() if k not in DIST_VARS}
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env=dict(base, SLURM_CONF=str(self.conf)))
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` of one job (its first record for an array's tasks) as a dict."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        rec = out.splitlines()[0] if out.strip() else ""
        return dict(kv.split("=", 1) for kv in re.findall(r"(\w+=\S*)", rec))

    def jobs(self, job_id: str) -> list[dict]:
        """Every record `scontrol show job` prints for an id (all tasks of an array)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return [dict(kv.split("=", 1) for kv in re.findall(r"(\w+=\S*)", rec)) for rec in out.splitlines() if rec]

    def wait(self, job_id: str, timeout: float = 120, states=FINAL_STATES) -> dict:
        """Block until every record of the job is in one of `states`; returns the (first) record."""
        deadline = time.time() + timeout
        while True:
            recs = self.jobs(job_id)
            if recs and all(r.get("JobState") in states for r in recs):
                return recs[0]
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout} s: {recs}")
            time.sleep(0.5)

    def idle(self) -> bool:
        """Whether the node is idle (no job on it)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return out == ["idle"]


def _write_conf(root: Path, node_line: str, ports: list[int]) -> tuple[Path, str, int]:
    # job ids (and so train.sbatch's MASTER_PORT = 20000 + id % 20000) differ from another cluster's on this host
    first_job = random.randrange(1000, 19000, 100)
    node = re.search(r"NodeName=(\S+)", node_line).group(1)
    cpus = int(re.search(r"CPUs=(\d+)", node_line).group(1))
    hw = " ".join(kv for kv in node_line.split() if kv.split("=")[0] in (
        "CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory"))
    conf = root / "slurm.conf"
    conf.write_text(f"""# written by tests/slurm.py: a single-node test cluster on this host
ClusterName=megapacktest
FirstJobId={first_job}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobRequeue=1
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=3600
InactiveLimit=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
PlugStackConfig={root}/plugstack.conf
NodeName={node} NodeAddr=127.0.0.1 {hw} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
""")
    (root / "plugstack.conf").write_text("")
    return conf, node, cpus


def start_cluster(timeout: float = 60) -> SlurmCluster:
    """Write a configuration, start munged, slurmctld and slurmd, wait until the node is idle."""
    missing = [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]
    if missing:
        raise SlurmUnavailable(f"{', '.join(missing)} not found. {ENABLE}")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"the test cluster runs its daemons as root (uid {os.geteuid()}). {ENABLE}")
    root = Path(tempfile.mkdtemp(prefix="mpslurm-", dir="/tmp"))  # short: the munge socket path has a length limit
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf, node, cpus = _write_conf(root, _node_line(), _free_ports(2))
    version = subprocess.run(["sinfo", "--version"], capture_output=True, text=True,
                             env=dict(os.environ, SLURM_CONF=str(conf))).stdout.split()[-1]
    cluster = SlurmCluster(root=root, conf=conf, node=node, cpus=cpus, version=version)
    env = cluster.env
    commands = {
        "munged": [_which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge.sock",
                   f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                   f"--seed-file={root}/munged.seed"],
        "slurmctld": [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
        "slurmd": [_which("slurmd"), "-D", "-f", str(conf), "-N", node],
    }
    try:
        for name, cmd in commands.items():
            log = open(root / f"{name}.out", "w")
            cluster.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True)
            if name == "munged":
                _wait_for(lambda: (root / "munge.sock").exists(), 20, cluster, "munged socket")
        _wait_for(cluster.idle, timeout, cluster, "node idle in sinfo")
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _wait_for(predicate, timeout: float, cluster: SlurmCluster, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        dead = {n: p.returncode for n, p in cluster.procs.items() if p.poll() is not None}
        if dead or time.time() > deadline:
            logs = "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(cluster.root.glob("*.out"))
                             + sorted(cluster.root.glob("*.log")))
            raise AssertionError(f"test cluster: no {what} (exited: {dead}) after {timeout} s\n{logs}")
        time.sleep(0.2)


def job_processes(cluster: SlurmCluster) -> list[psutil.Process]:
    """Live processes started for this cluster's jobs (slurmstepd and tasks carry its SLURM_CONF), daemons aside."""
    daemons = {p.pid for p in cluster.procs.values()}
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid in daemons or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("SLURM_CONF") == str(cluster.conf):  # slurmstepd gets it from our slurmd
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def stop_cluster(cluster: SlurmCluster) -> list[str]:
    """Cancel every job, stop the daemons this module started (by pid); returns leftover processes (none expected)."""
    if cluster.procs.get("slurmctld") and cluster.procs["slurmctld"].poll() is None:
        cluster.run("scancel", "--full", "--quiet", "--user", "root", check=False)
        deadline = time.time() + 30
        while job_processes(cluster) and time.time() < deadline:
            time.sleep(0.2)
    leftovers = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in job_processes(cluster) if p.is_running()]
    for name in reversed(DAEMONS):
        proc = cluster.procs.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return leftovers
