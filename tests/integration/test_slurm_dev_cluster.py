"""The dev cluster of slurm/local/ itself, real daemons: two nodes on this one host (two slurmd), a job
with one task on each, a job that loses a node, the launcher's Slurm executor running a two-node torchrun
job, and a cluster that
keeps to its own files and daemons (its own SLURM_CONF, munged and pid files; nothing under /etc; stop.sh
stops only what start.sh started)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jp_peft.cluster.slurm_jobs import job_info, wait_for

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "slurm/local"
pytestmark = pytest.mark.slurm
# torchrun runs this on each node: a gloo all_reduce over the two ranks, and where each rank ran.
ALLREDUCE = """import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
print(f"two-nodes: rank {dist.get_rank()} of {dist.get_world_size()} on {os.environ['SLURMD_NODENAME']} "
      f"sum {total.item():g}", flush=True)
dist.destroy_process_group()
"""


def slurm_dir() -> Path:
    """The dev cluster's runtime directory (the `cluster` fixture exports its SLURM_CONF)."""
    return Path(os.environ["SLURM_CONF"]).parent


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def pid_in(path: Path) -> int:
    return int(path.read_text().strip())


def test_the_cluster_runs_on_its_own_config_and_daemons(cluster):
    dev_dir = slurm_dir()
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert re.search(rf"^SLURM_CONF\s+= {re.escape(str(dev_dir))}/slurm.conf$", config, re.M), config[:2000]
    assert re.search(r"^SlurmctldPort\s+= 6917$", config, re.M)  # not Slurm's default 6817
    assert re.search(rf"^AuthInfo\s+= socket={re.escape(str(dev_dir))}/munge/munge.socket$", config, re.M)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, check=True).stdout
    assert sorted(line.split()[0] for line in nodes.splitlines()) == cluster == ["node1", "node2"], nodes
    daemons = {"munged": dev_dir / "munge/munged.pid", "slurmctld": dev_dir / "slurmctld.pid",
               **{f"slurmd -N {n}": dev_dir / f"slurmd-{n}.pid" for n in cluster}}
    pids = {name: pid_in(path) for name, path in daemons.items()}
    for name, pid in pids.items():  # each daemon runs on the cluster's own files, under dev_dir
        assert str(dev_dir) in cmdline(pid) and name.split()[0] in cmdline(pid), (name, cmdline(pid))
    assert f"-N {cluster[1]}" in cmdline(pids[f"slurmd -N {cluster[1]}"])
    again = subprocess.run(["bash", str(LOCAL / "start.sh"), "--nodes", "2"], capture_output=True, text=True)
    assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr
    assert {name: pid_in(path) for name, path in daemons.items()} == pids  # idempotent: nothing restarted


def test_a_two_node_job_runs_one_task_on_each_node(cluster, tmp_path):
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "-o", str(tmp_path / "%j.out"),
                          "--wrap", "srun bash -c 'echo task $SLURM_PROCID on $SLURMD_NODENAME node $SLURM_NODEID'"],
                         capture_output=True, text=True, check=True).stdout.strip()
    states = wait_for({"two-nodes": job}, timeout_s=120, poll_s=1, log=lambda *_: None)
    assert states["two-nodes"][0] == "COMPLETED", (states, job_info(job))
    assert job_info(job)["NodeList"] == "node[1-2]"
    lines = sorted(re.findall(r"^task (\d) on (\S+) node (\d)$", (tmp_path / f"{job}.out").read_text(), re.M))
    assert lines == [("0", "node1", "0"), ("1", "node2", "1")], (tmp_path / f"{job}.out").read_text()


def test_a_two_node_job_that_loses_a_node_ends_at_once_saying_which(cluster, tmp_path):
    """A node of the dev cluster can be lost on purpose (scontrol: DOWN): the job on it ends NODE_FAIL within
    seconds, not at its time limit, and its log names the node."""
    job = subprocess.run(["sbatch", "--parsable", "--no-requeue", "--nodes=2", "--ntasks-per-node=1",
                          "-o", str(tmp_path / "%j.out"), "--wrap", "srun sleep 300"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        for _ in range(120):
            if job_info(job).get("JobState") == "RUNNING":
                break
            time.sleep(0.5)
        assert job_info(job)["JobState"] == "RUNNING", job_info(job)
        time.sleep(1)  # the step is launched on both nodes
        subprocess.run(["scontrol", "update", f"nodename={cluster[1]}", "state=down", "reason=jp-peft-test"],
                       check=True)
        states = wait_for({"lost": job}, timeout_s=60, poll_s=0.5, log=lambda *_: None)
    finally:
        subprocess.run(["scontrol", "update", f"nodename={cluster[1]}", "state=resume"], check=False)
        for _ in range(60):  # back to idle before the next test
            if subprocess.run(["sinfo", "-h", "-n", cluster[1], "-o", "%T"], capture_output=True,
                              text=True).stdout.strip() == "idle":
                break
            time.sleep(0.5)
    assert states["lost"][0] == "NODE_FAIL", (states, job_info(job))
    assert f"Node failure on {cluster[1]}" in (tmp_path / f"{job}.out").read_text()


def test_the_launchers_slurm_executor_runs_a_two_node_torchrun_job(cluster, tmp_path):
    """The executor the launcher builds for a distributed stage (here on CPU: one torchrun per node, one process
    each), submitted by NeMo-Run: the rendered script's head node, rendezvous endpoint and node count work with
    two nodes; both ranks join one gloo group, one on each node."""
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE)
    submit = f"""
import sys
import nemo_run as run
from jp_peft.cluster.executors import load_profile, slurm_executor, use_slurm_conf
from jp_peft.cluster.slurm_jobs import job_id_of

profile = load_profile("local")
use_slurm_conf(profile)
executor = slurm_executor(profile, {str(tmp_path / "experiments")!r}, torchrun=True, nodes=2, on_cpu=True)
with run.Experiment("two-nodes", base_dir={str(tmp_path)!r}, log_level="WARN") as exp:
    exp.add(run.Script(path={str(script)!r}, entrypoint="python"), executor=executor, name="allreduce")
    exp.run(detach=True, tail_logs=False)
    print("JOB", job_id_of(exp.jobs[0].handle), exp.jobs[0].executor.job_details.stdout)
"""
    proc = subprocess.run([sys.executable, "-c", submit], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job, batch_log = re.search(r"^JOB (\d+) (\S+)$", proc.stdout, re.M).groups()
    states = wait_for({"allreduce": job}, timeout_s=240, poll_s=1, log=lambda *_: None)
    batch_log = Path(batch_log.replace("%j", job))
    assert states["allreduce"][0] == "COMPLETED", batch_log.read_text()[-3000:]
    sbatch = next(tmp_path.rglob("allreduce_sbatch.sh")).read_text()
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert re.search(r"torchrun --rdzv-backend c10d --rdzv-endpoint \$head_node_ip:29500 .*--nnodes 2 "
                     r"--nproc-per-node 1 --node-rank \$SLURM_NODEID", sbatch), sbatch
    text = "".join(p.read_text() for p in batch_log.parent.glob("log-*.out"))
    ranks = sorted(re.findall(r"two-nodes: rank (\d) of (\d) on (\S+) sum (\S+)", text))
    # torchrun's c10d rendezvous numbers the nodes in the order they join (--node-rank is not used with it),
    # so which node has rank 0 varies: one rank on each node is what holds
    assert [(r, w, s) for r, w, _, s in ranks] == [("0", "2", "3"), ("1", "2", "3")], text[-3000:]
    assert sorted(node for *_, node, _ in ranks) == ["node1", "node2"], ranks


def _system_files() -> dict[str, tuple]:
    """What a careless dev cluster would change: the system's Slurm and munge configuration and munged's
    runtime directory (name -> size, mtime)."""
    found = {}
    for top in ("/etc/slurm", "/etc/munge", "/run/munge"):
        for path in sorted(Path(top).rglob("*")) if Path(top).exists() else []:
            stat = path.lstat()
            found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _decoy(directory: Path, name: str) -> subprocess.Popen:
    """A process named `name` (what `pgrep -x`/`pkill -x` match: a copy of sleep with that file name) that
    this cluster did not start."""
    program = directory / name
    shutil.copy(shutil.which("sleep"), program)
    return subprocess.Popen([str(program), "300"])


def test_a_second_cluster_starts_and_stops_without_touching_the_first_or_any_other_daemon(cluster, tmp_path):
    """start.sh and stop.sh of another cluster (its own directory and ports, as a second checkout could run)
    leave the first cluster, the system's files and same-named daemons alone; stop.sh stops what it started
    by its recorded pids, and refuses a pid that is no longer its daemon."""
    dev_dir = slurm_dir()
    first = {p.name: pid_in(p) for p in [dev_dir / "slurmctld.pid", *dev_dir.glob("slurmd-*.pid")]}
    before = _system_files()
    decoys = [_decoy(tmp_path, name) for name in ("slurmd", "slurmctld", "munged")]
    # munged runs as the munge user, who cannot enter pytest's private (0700) temporary directories
    other = Path(tempfile.mkdtemp(prefix="jp-peft-slurm-test-", dir="/tmp"))
    other.chmod(0o755)
    env = {**os.environ, "JP_PEFT_SLURM_DIR": str(other), "JP_PEFT_SLURM_PORT": "6927"}
    env.pop("SLURM_CONF")  # start.sh sets its own
    try:
        up = subprocess.run(["bash", str(LOCAL / "start.sh")], capture_output=True, text=True, env=env, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                              env={**env, "SLURM_CONF": str(other / "slurm.conf")})
        assert "UP" in ping.stdout, ping.stdout + ping.stderr
        started = {p.name: pid_in(p) for p in [other / "slurmctld.pid", other / "munge/munged.pid",
                                                *other.glob("slurmd-*.pid")]}
        assert len(started) == 3
        down = subprocess.run(["bash", str(LOCAL / "stop.sh")], capture_output=True, text=True, env=env, timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr
        assert all(not Path(f"/proc/{pid}").exists() for pid in started.values()), down.stdout
        assert all(d.poll() is None for d in decoys), "stop.sh killed a process it did not start"
        # a recorded pid that now belongs to another process (here: a slurmctld look-alike) is left alone
        (other / "slurmctld.pid").write_text(f"{decoys[1].pid}\n")
        again = subprocess.run(["bash", str(LOCAL / "stop.sh")], capture_output=True, text=True, env=env)
        assert f"pid {decoys[1].pid} is not this cluster's slurmctld; left alone" in again.stdout, again.stdout
        assert all(d.poll() is None for d in decoys)
    finally:
        subprocess.run(["bash", str(LOCAL / "stop.sh")], capture_output=True, env=env)
        for d in decoys:
            d.kill()
            d.wait()
        shutil.rmtree(other, ignore_errors=True)
    assert {p.name: pid_in(p) for p in [dev_dir / "slurmctld.pid", *dev_dir.glob("slurmd-*.pid")]} == first
    assert subprocess.run(["bash", str(LOCAL / "status.sh")], capture_output=True).returncode == 0
    assert _system_files() == before  # nothing under /etc/slurm, /etc/munge or /run/munge was written
