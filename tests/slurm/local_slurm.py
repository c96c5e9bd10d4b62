"""A real local Slurm 22.05 cluster with emulated nodes on this host, for tests.

Everything lives in one fresh directory (config, munge key and socket, state, spool, logs) and
every port is picked free, so it neither touches /etc/slurm, /etc/munge or /run/munge nor collides
with another cluster on the same host. The daemons run in the foreground (``munged -F``,
``slurmctld -D``, ``slurmd -D``) as children of this process, and :meth:`LocalSlurm.stop` ends
exactly those pids. Clients need ``SLURM_CONF`` (see :meth:`LocalSlurm.env`).

Facts from PLATFORM.md ("Slurm"): munged must run as the munge user with a key it owns (mode
0400); slurmctld/slurmd run as root without systemd; several nodes share one host when each
``slurmd -N nX`` has its own port; all of them share 127.0.0.1.

Run standalone for debugging: ``python tests/slurm/local_slurm.py`` starts a cluster, prints its
SLURM_CONF and waits for Ctrl-C.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_port_pair() -> int:
    """A port p with p and p+1 both free on 127.0.0.1 (slurm.conf node ports are a range)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 1 >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """``n_nodes`` emulated nodes ``n1..nN`` (``cpus`` each) in partition ``test``."""

    def __init__(self, n_nodes: int = 2, cpus: int = 2, gpus: int = 0, root: str | None = None,
                 task_plugin: str = "task/affinity", task_plugin_param: str | None = "Cores"):
        self.n_nodes, self.cpus, self.gpus = n_nodes, cpus, gpus
        # Tasks bound to cores, as on clusters that bind (task/affinity or task/cgroup, e.g.
        # TaskPluginParam=Cores): every task runs on exactly the cores its step asked for, so an
        # `srun --ntasks=1` without -c lands on one core (os.sched_getaffinity) and a launcher
        # that forgets -c is caught. task_plugin="task/none" turns binding off.
        self.task_plugin, self.task_plugin_param = task_plugin, task_plugin_param
        # /tmp dirs from pytest are 0700 root: the munge user could not reach its key there
        self.dir = Path(root or tempfile.mkdtemp(prefix="tppo-slurm-"))
        self.dir.chmod(0o755)
        self.conf = self.dir / "slurm.conf"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list = []

    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # ---------------------------------------------------------------- start
    def start(self, timeout_s: float = 60.0) -> "LocalSlurm":
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for i in range(1, self.n_nodes + 1):
                self._spawn(f"slurmd-n{i}", [_which("slurmd"), "-D", "-N", f"n{i}", "-f", str(self.conf)])
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        log = open(self.dir / f"{name}.out", "w")
        self._logs.append(log)
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.dir, **kw)
        self.procs.append((name, p))
        return p

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        mdir = self.dir / "munge"
        mdir.mkdir()
        mdir.chmod(0o711)  # munged: the socket dir must be executable by all; the key stays 0400
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        for p in (mdir, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        self.munge_socket = mdir / "munge.socket"
        argv = ["runuser", "-u", "munge", "--", _which("munged"), "-F", f"--key-file={key}",
                f"--socket={self.munge_socket}", f"--pid-file={mdir / 'munged.pid'}",
                f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"]
        self._spawn("munged", argv)
        deadline = time.time() + 15
        while not self.munge_socket.exists():
            if time.time() > deadline or self.procs[-1][1].poll() is not None:
                raise RuntimeError(f"munged did not start: {self._tail('munged')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        for i in range(1, self.n_nodes + 1):
            (d / "spool" / f"n{i}").mkdir()
        host = socket.gethostname()
        nport = _free_port_pair() if self.n_nodes == 2 else None
        if nport is None:
            raise NotImplementedError("only 2 nodes are wired up (consecutive node ports)")
        self.conf.write_text("\n".join([
            "ClusterName=tppotest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            f"TaskPlugin={self.task_plugin}",
            *([f"TaskPluginParam={self.task_plugin_param}"] if self.task_plugin_param else []),
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # CPUs below, whatever the host has
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}",
            f"SlurmdPidFile={d / 'slurmd'}.%n.pid",
            f"SlurmctldLogFile={d / 'slurmctld.log'}",
            f"SlurmdLogFile={d / 'slurmd'}.%n.log",
            f"PlugStackConfig={d / 'plugstack.conf'}",
            "KillWait=10",
            *(["GresTypes=gpu"] if self.gpus else []),
            f"NodeName=n[1-{self.n_nodes}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{nport}-{nport + 1}] "
            f"CPUs={self.cpus}" + (f" Gres=gpu:{self.gpus}" if self.gpus else "") + " State=UNKNOWN",
            f"PartitionName=test Nodes=n[1-{self.n_nodes}] Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        (d / "plugstack.conf").write_text("")
        if self.gpus:
            # gres "GPUs": character devices (like /dev/null) that slurmd hands out by index and
            # announces in CUDA_VISIBLE_DEVICES (PLATFORM.md); Ray then takes them as logical GPUs
            devs = d / "dev"
            devs.mkdir()
            for i in range(self.gpus):
                os.mknod(devs / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            (d / "gres.conf").write_text(
                f"NodeName=n[1-{self.n_nodes}] Name=gpu File={devs}/gpu[0-{self.gpus - 1}]\n")

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        out = ""
        while time.time() < deadline:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self._tail(name)}")
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True)
            out = r.stdout + r.stderr
            states = [ln.split()[1] for ln in r.stdout.splitlines() if len(ln.split()) == 2]
            if r.returncode == 0 and len(states) == self.n_nodes and all(s == "idle" for s in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout_s} s: {out!r}\n{self._tail('slurmctld')}")

    def _tail(self, name: str, n: int = 3000) -> str:
        texts = []
        for f in (self.dir / f"{name}.out", self.dir / f"{name}.log", self.dir / "munge" / "munged.log"):
            if f.name.startswith(name.split("-")[0]) and f.exists():
                texts.append(f"--- {f}\n{f.read_text()[-n:]}")
        return "\n".join(texts)

    # ---------------------------------------------------------------- jobs
    def sbatch(self, args: list[str], cwd: str | Path, env: dict | None = None) -> str:
        r = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env(), **(env or {})},
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        r = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env(), capture_output=True, text=True)
        info: dict[str, str] = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def allocated_cpus(self, job_id: str, timeout_s: float = 120.0) -> dict[str, list[int]]:
        """The CPU ids the running job holds on each of its nodes (``scontrol show job -d``:
        ``Nodes=n[1-2] CPU_IDs=0-1 ...``), waiting until it runs; only a running job shows them.
        Slurm's ids; on the emulated nodes (``CPUs`` = the host's cores) they are the OS's."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            r = subprocess.run(["scontrol", "show", "job", "-d", job_id], env=self.env(),
                               capture_output=True, text=True)
            found: dict[str, list[int]] = {}
            for m in re.finditer(r"\bNodes=(\S+) CPU_IDs=(\S+)", r.stdout):
                ids: list[int] = []
                for part in m.group(2).split(","):
                    lo, _, hi = part.partition("-")
                    ids.extend(range(int(lo), int(hi or lo) + 1))
                names = subprocess.run(["scontrol", "show", "hostnames", m.group(1)], env=self.env(),
                                       capture_output=True, text=True).stdout.split()
                found.update({n: ids for n in names})
            if found:
                return found
            if self.job_info(job_id).get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"):
                break
            time.sleep(0.5)
        raise RuntimeError(f"job {job_id}: no CPU_IDs in `scontrol show job -d` (not running?)")

    def requeue(self, job_id: str, timeout_s: float = 120.0) -> None:
        """``scontrol requeue``, then let the job start again at once: Slurm holds a requeued job
        back for a while (Reason=BeginTime), which only slows the test down."""
        r = subprocess.run(["scontrol", "requeue", job_id], env=self.env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"scontrol requeue {job_id} failed: {r.stderr}")
        deadline = time.time() + timeout_s
        while time.time() < deadline and self.job_info(job_id).get("JobState") != "PENDING":
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=self.env(),
                       capture_output=True, text=True)

    def wait_job(self, job_id: str, timeout_s: float, poll_s: float = 2.0) -> dict[str, str]:
        """Poll ``scontrol show job -o`` until the job leaves PENDING/RUNNING/COMPLETING."""
        deadline = time.time() + timeout_s
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") not in (None, "PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED"):
                return info
            time.sleep(poll_s)
        subprocess.run(["scancel", job_id], env=self.env())
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s} s")

    # ---------------------------------------------------------------- stop
    def stop(self) -> None:
        """SIGTERM the daemons this object started (slurmds, slurmctld, then munged), by pid."""
        for name, p in reversed(self.procs):
            if p.poll() is None:
                # munged runs under runuser: signal the runuser pid, which forwards it
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()


if __name__ == "__main__":
    cluster = LocalSlurm().start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
