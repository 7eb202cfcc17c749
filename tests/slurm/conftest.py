"""A real slurm cluster on this one machine for the launcher tests (slurm/*.sbatch).

Debian's slurmctld + two slurmd daemons (two fake nodes, `mlslurm1` / `mlslurm2`, resolving to
127.0.0.1 through /etc/hosts), `auth/none`, `proctrack/linuxproc`, `task/none`, no accounting and
no GPUs; everything (config, state, spool, logs) under one temporary directory. Needs root (the
daemons run as root, /etc/hosts is edited, packages may be installed): otherwise, or when the
packages cannot be installed, every test using the `slurm_cluster` fixture is skipped with the
reason. Start-up takes a few seconds (plus the apt-get install on a fresh machine); the daemons
are stopped and the /etc/hosts line removed at the end of the session.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODES = ("mlslurm1", "mlslurm2")
NODE_CPUS = 4  # per fake node; config_overrides lets it exceed the real core count
HOSTS_MARK = "# megatron_latent tests/slurm (removed at the end of the test session)"
PACKAGES = ("slurmctld", "slurmd", "slurm-client")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ensure_slurm() -> str | None:
    """None when the slurm binaries are there (installing them if needed), else why not."""
    if sys.platform != "linux":
        return "the slurm tests need Linux"
    if os.geteuid() != 0:
        return "the slurm tests need root (daemons as root, /etc/hosts, apt-get)"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return "slurm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"installing slurm failed: {' '.join(cmd)}: {e}"
        if r.returncode != 0:
            return f"installing slurm failed: {' '.join(cmd)}: {(r.stdout + r.stderr)[-800:]}"
    missing = [b for b in BINARIES if not shutil.which(b)]
    return f"slurm binaries missing after install: {missing}" if missing else None


def _clean_env() -> dict:
    """This process's environment without an enclosing job's SLURM_* / torchrun variables."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RUN_ID"}
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
            and k not in drop}


@dataclass
class Job:
    id: str
    state: str = ""
    exit_code: str = ""
    stdout: str = ""
    elapsed_s: float = 0.0

    def log(self) -> str:
        p = Path(self.stdout)
        return p.read_text(errors="replace") if p.is_file() else ""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    nodes: tuple = NODES
    procs: list = field(default_factory=list)
    ports: list = field(default_factory=list)
    hosts_added: bool = False

    # -- client side -----------------------------------------------------------------------
    @property
    def env(self) -> dict:
        """Environment for client commands and jobs (CPU mode, wandb off, HF offline)."""
        return {**_clean_env(), "SLURM_CONF": str(self.conf), "MEGATRON_LATENT_CPU": "1",
                "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"}

    def run(self, *cmd, env=None, check=True, timeout=30, cwd=None) -> subprocess.CompletedProcess:
        r = subprocess.run([str(c) for c in cmd], env=env or self.env, capture_output=True,
                           text=True, timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def submit(self, *cmd, env=None, cwd=None) -> str:
        """Run a submitting command (`sbatch --parsable ...` or `slurm/submit.sh ... --parsable`);
        returns the job id."""
        r = self.run(*cmd, env=env, cwd=cwd)
        m = re.search(r"^(\d+)(;\S+)?$", r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")
        if not m:
            raise RuntimeError(f"no job id from {cmd}: {r.stdout}{r.stderr}")
        return m.group(1)

    def job_info(self, job_id: str) -> dict:
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}

    def wait(self, job_id: str, timeout: float = 120.0, poll: float = 0.25) -> Job:
        """Poll until the job reaches a final state (no `sbatch --wait`: it backs off to ~10 s)."""
        t0 = time.time()
        info: dict = {}
        while time.time() - t0 < timeout:
            info = self.job_info(job_id) or info
            if info.get("JobState") in TERMINAL:
                break
            time.sleep(poll)
        else:
            self.run("scancel", job_id, check=False)
            raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s: {info}\n"
                               + Job(job_id, stdout=info.get("StdOut", "")).log()[-3000:])
        return Job(job_id, info.get("JobState", "?"), info.get("ExitCode", "?"),
                   info.get("StdOut", ""), time.time() - t0)

    def wait_for_log(self, job: str, pattern: str, path: Path, timeout: float = 60.0) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if path.is_file() and re.search(pattern, path.read_text(errors="replace")):
                return
            time.sleep(0.25)
        raise TimeoutError(f"{pattern!r} not in {path} after {timeout} s (job {job})")

    # -- daemons ---------------------------------------------------------------------------
    def write_conf(self) -> None:
        ctld, slurmd, *node_ports = self.ports
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={NODE_CPUS} "
                          f"RealMemory=1000 State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        r = self.root
        self.conf.write_text(f"""\
ClusterName=mltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        self.ports = [_free_port() for _ in range(2 + len(self.nodes))]
        (self.root / "state").mkdir(parents=True)
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True)
        self.write_conf()
        self._add_hosts()
        env = self.env
        log = open(self.root / "daemons.out", "ab")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(self.conf)], env=env,
                                           stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        for n in self.nodes:
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", n],
                                               env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        t0 = time.time()
        states = ""
        while time.time() - t0 < 30:
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                break
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
            states = r.stdout.strip()
            if r.returncode == 0 and sorted(states.splitlines()) == sorted(f"{n} idle" for n in self.nodes):
                return
            time.sleep(0.25)
        msg = f"slurm did not come up (sinfo: {states!r}, exited: {[p.args for p in self.procs if p.poll() is not None]})"
        for f in sorted(self.root.glob("*.log")) + [self.root / "daemons.out"]:
            if f.is_file():
                msg += f"\n--- {f.name}\n" + f.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(msg)

    @property
    def hosts_line(self) -> str:
        # Tagged with this cluster's directory: concurrent sessions each add and remove their own.
        return f"127.0.0.1 {' '.join(self.nodes)} {HOSTS_MARK} {self.root}\n"

    def _add_hosts(self) -> None:
        with open("/etc/hosts", "a") as f:  # in place: /etc/hosts is often a bind mount
            f.write(self.hosts_line)
        self.hosts_added = True

    def _remove_hosts(self) -> None:
        if self.hosts_added:
            _remove_hosts_lines(lambda line: line == self.hosts_line)
            self.hosts_added = False

    def stop(self) -> None:
        if not self.procs:
            self._remove_hosts()
            return
        try:  # end the jobs first so that no slurmstepd / task outlives the daemons
            r = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
            ids = r.stdout.split()
            if ids:
                self.run("scancel", *ids, check=False, timeout=10)
                t0 = time.time()
                while time.time() - t0 < 15 and self.run(
                        "squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split():
                    time.sleep(0.25)
        except (OSError, subprocess.SubprocessError):
            pass
        for p in reversed(self.procs):  # slurmds, then slurmctld
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
        t0 = time.time()
        while time.time() - t0 < 10 and any(_port_open(p) for p in self.ports):
            time.sleep(0.2)
        self._remove_hosts()
        shutil.rmtree(self.root, ignore_errors=True)


def _remove_hosts_lines(drop) -> None:
    lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
    keep = [line for line in lines if not (HOSTS_MARK in line and drop(line))]
    if keep != lines:
        with open("/etc/hosts", "w") as f:  # rewrite in place, keeping the inode
            f.writelines(keep)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_stale_clusters() -> None:
    """Leftovers of an earlier session killed before its teardown (its pytest process is gone):
    stop its daemons by the PIDs in their pid files (checking that the PID still runs with that
    cluster's conf), drop its /etc/hosts line and directory. Live sessions are left alone."""
    stale = []
    for root in Path(tempfile.gettempdir()).glob("mlslurm-*"):
        try:
            owner = int((root / "owner.pid").read_text())
        except (OSError, ValueError):
            owner = 0
        if owner and _pid_alive(owner):
            continue
        stale.append(str(root))
        conf = str(root / "slurm.conf")
        for pid_file in root.glob("*.pid"):
            try:
                pid = int(pid_file.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if conf.encode() in cmdline:
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        shutil.rmtree(root, ignore_errors=True)
    if stale:
        _remove_hosts_lines(lambda line: line.split()[-1] in stale)


@pytest.fixture(scope="session")
def slurm_cluster():
    why = _ensure_slurm()
    if why:
        pytest.skip(why)
    _stop_stale_clusters()
    root = Path(tempfile.mkdtemp(prefix="mlslurm-"))  # short: slurmd puts unix sockets in it
    (root / "owner.pid").write_text(str(os.getpid()))
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf")
    atexit.register(cluster.stop)  # in case the session dies without fixture teardown
    t0 = time.time()
    cluster.start()
    print(f"\n[slurm fixture] cluster up in {time.time() - t0:.1f} s "
          f"({', '.join(NODES)}, conf {cluster.conf})")
    try:
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> str:
    """The demo's tiny-a Qwen2.5-VL checkpoint, built once (the demo would build one per run)."""
    from megatron_latent.testing.tiny_checkpoint import make_tiny_qwen25vl

    return str(make_tiny_qwen25vl(tmp_path_factory.mktemp("slurm_hf") / "tiny-a",
                                  preset="tiny-a", seed=0))
