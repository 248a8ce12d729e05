"""The experiment on the real dev Slurm cluster (slurm/local/, two nodes): submission with afterok
dependencies, a failing stage that stops its dependents, and a requeue that resumes."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jp_peft.cluster.slurm_jobs import job_info, wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm
EXPERIMENT = [sys.executable, str(REPO / "experiments/qwen_lora_ja.py"), "--executor", "slurm", "--slurm-profile", "local"]
SHORT = ["cpt.train.max_steps=8", "cpt.train.val_check_interval=4", "cpt.train.limit_val_batches=2",
         "sft.train.max_steps=6", "sft.train.val_check_interval=3", "sft.train.limit_val_batches=2",
         "eval.limit=12"]  # as conftest.SMOKE_EVAL_LIMIT: the preset scores every item (minutes per model)


def submitted_jobs(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\S+): slurm job (\d+), log", stdout, flags=re.M))


@pytest.fixture(scope="module")
def slurm_smoke(cluster, tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("slurm_runs")
    proc = subprocess.run([*EXPERIMENT, "--smoke", "--wait", "--output-dir", str(out), *SHORT], capture_output=True,
                          text=True, timeout=1200, cwd=REPO)
    return out, proc


def test_stages_complete_in_dependency_order(slurm_smoke):
    out, proc = slurm_smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = submitted_jobs(proc.stdout)
    order = ["smoke-import", "smoke-data", "smoke-cpt", "smoke-export-cpt", "smoke-sft", "smoke-export-sft", "smoke-eval"]
    assert list(jobs) == order
    infos = [job_info(jobs[name]) for name in order]
    assert [i["JobState"] for i in infos] == ["COMPLETED"] * len(order)
    # Slurm clears a met dependency (Dependency=(null) afterwards), but keeps when the job became eligible:
    # a job without a dependency is eligible at its submission, one with afterok when its dependency ended.
    # Every job was submitted up front (before the CPT ended), so only afterok makes these hold.
    cpt_end = infos[order.index("smoke-cpt")]["EndTime"]
    assert max(i["SubmitTime"] for i in infos) < cpt_end, [(i["JobId"], i["SubmitTime"]) for i in infos]
    for before, after in zip(infos, infos[1:]):
        assert after["EligibleTime"] >= before["EndTime"], (before["JobId"], before["EndTime"], after)
        assert after["StartTime"] >= after["EligibleTime"]
    for stage in ("cpt", "sft"):
        d = out / "smoke" / stage
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["steps"] == (8 if stage == "cpt" else 6)
        assert (d / "hf_adapter" / "adapter_model.safetensors").exists() and (d / "hf_merged" / "config.json").exists()
        checks = json.loads((d / "export.json").read_text())["checks"]
        assert sorted(c["check"] for c in checks) == ["hf_merged_vs_trained", "peft_adapter_vs_hf_merged"]
        assert all(c["ok"] is True for c in checks), checks
    assert "JA before" in proc.stdout
    # --wait shows the training progress a local launch shows, read from the jobs' logs
    assert re.search(r"\[jp-peft\] smoke-cpt: step \d+/8 loss \d+\.\d+ [\d,]+ tok/s ETA", proc.stdout), proc.stdout[-3000:]
    status = subprocess.run([sys.executable, "-m", "jp_peft.cli", "status", str(out / "smoke")], capture_output=True,
                            text=True, cwd=REPO)
    assert status.returncode == 0, status.stderr
    for name in order:
        assert re.search(rf"^  {name} +done  \(job \d+ COMPLETED\)$", status.stdout, re.M), status.stdout
    assert "[jp-peft] sft step 6/6" in status.stdout
    batch_logs = sorted(out.rglob("sbatch_jp-peft.smoke-*.out"))
    assert len(batch_logs) == len(order)
    for log in batch_logs:  # every job printed the stack it ran, and it was the pinned one
        assert re.search(r"^jp-peft stack: nemo_toolkit 2\.7\.3, megatron-core 0\.15\.\d+, ", log.read_text(), re.M), log


def test_failing_stage_leaves_dependents_unrun_and_points_to_its_log(cluster, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for prefix in ("ja", "ja_val", "en_val"):  # present, so the launcher accepts them; corrupt, so cpt fails
        (data / f"{prefix}_text_document.bin").write_bytes(b"\x00" * 16)
        (data / f"{prefix}_text_document.idx").write_bytes(b"not an index")
    (data / "sft").mkdir()
    (data / "sft" / "training.jsonl").write_text("")
    overrides = [f"cpt.data.blend=[{{name: ja, weight: 1.0, prefix: {data}/ja_text_document}}]",
                 f"data.val_ja={data}/ja_val_text_document", f"data.val_en={data}/en_val_text_document",
                 f"sft.data.sft_train={data}/sft/training.jsonl", "wandb.enabled=false"]
    proc = subprocess.run([*EXPERIMENT, "--smoke", "--wait", "--stages", "import,cpt,sft", "--name", "broken",
                           "--output-dir", str(tmp_path / "runs"), *overrides], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 1
    jobs = submitted_jobs(proc.stdout)
    assert job_info(jobs["broken-import"])["JobState"] == "COMPLETED"
    assert job_info(jobs["broken-cpt"])["JobState"] == "FAILED"
    sft = job_info(jobs["broken-sft"])
    assert sft["JobState"] == "CANCELLED"  # it could never start: not left pending in the queue
    assert "cancelled broken-sft: a job they depend on failed" in proc.stderr
    # it never ran: never eligible (its afterok was never met), no run time (a cancelled pending job gets
    # StartTime = EndTime = the cancel time, so StartTime shows nothing)
    assert sft["EligibleTime"] == "Unknown" and sft["RunTime"] == "00:00:00", sft
    log = re.search(r"FAILED: broken-cpt: FAILED \(\S+\); log: (\S+)", proc.stderr)
    assert log, proc.stderr
    log_path = Path(log.group(1).replace("%j", jobs["broken-cpt"]))
    text = log_path.read_text() + "".join(p.read_text() for p in log_path.parent.glob("log-*.out"))
    assert "ja_text_document" in text and "Error" in text  # the cause is in the job's own log


def test_requeued_job_resumes_from_its_checkpoint(slurm_smoke):
    """A requeued CPT job (SIGTERM from Slurm: PreemptionCheckpoint saves, the job starts again and resumes)
    trains what the same job trains without a requeue, bit for bit, with the presets' LoRA dropout (0.1):
    StepSeed seeds each step from (seed, step). Whenever the requeue lands, the result must be the same."""
    out, proc = slurm_smoke
    assert proc.returncode == 0
    steps = 12
    args = ["--smoke", "--stages", "cpt", "--output-dir", str(out), "group=smoke", f"cpt.train.max_steps={steps}",
            "cpt.train.ckpt_every_n_steps=3", "cpt.train.val_check_interval=4", "cpt.train.limit_val_batches=2",
            "wandb.enabled=false"]
    reference = subprocess.run([*EXPERIMENT, *args, "--name", "requeue-ref", "--wait"], capture_output=True, text=True,
                               timeout=900, cwd=REPO)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    submit = subprocess.run([*EXPERIMENT, *args, "--name", "requeue"], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    job = submitted_jobs(submit.stdout)["requeue-cpt"]
    ckpt = out / "requeue" / "cpt" / "checkpoints" / "step=000003.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:  # any moment after this is as good: no race to win
        time.sleep(0.5)
    assert ckpt.exists(), job_info(job)
    subprocess.run(["scontrol", "requeue", job], check=True)
    # a requeued job waits before it is eligible again; let it start now
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=False)
    states = wait_for({"requeue-cpt": job}, timeout_s=600, poll_s=2, log=lambda *_: None)
    info = job_info(job)
    assert states["requeue-cpt"][0] == "COMPLETED" and int(info["Restarts"]) == 1
    metrics = json.loads((out / "requeue" / "cpt" / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["resumed_from"]
    assert json.loads((out / "requeue" / "spec.json").read_text())["lora"]["dropout"] == 0.1

    def losses(name):
        rows = [json.loads(x) for x in open(out / name / "cpt" / "train_log.jsonl") if '"train/loss"' in x]
        return [(r["trainer/global_step"], r["train/loss"]) for r in rows]

    assert [s for s, _ in losses("requeue")] == list(range(1, steps + 1))  # nothing repeated, nothing skipped
    assert losses("requeue") == losses("requeue-ref")  # bit for bit
    from safetensors.torch import load_file
    import torch

    got, ref = (load_file(out / name / "cpt" / "hf_adapter" / "adapter_model.safetensors")
                for name in ("requeue", "requeue-ref"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_job_logs_never_contain_the_wandb_key(cluster, tmp_path, tiny_base):
    """A profile's wandb_key_file is read by the job under NeMo-Run's `set -evx`: the trace shows the
    read, never the key (nor does anything else the job or the launcher writes)."""
    key = "wandbkey-cluster-7e1d04b9c3a25f68-never-logged"
    key_file = tmp_path / "secrets" / "wandb_key"
    key_file.parent.mkdir()
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    profile = tmp_path / "local_with_key.yaml"
    profile.write_text((REPO / "slurm/local.yaml").read_text() + f"wandb_key_file: {key_file}\n")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}  # the key comes from the file only
    proc = subprocess.run([*EXPERIMENT[:-1], str(profile), "--smoke", "--wait", "--stages", "import", "--name", "keyed",
                           "--output-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert job_info(submitted_jobs(proc.stdout)["keyed-import"])["JobState"] == "COMPLETED"
    logs = sorted((tmp_path / "runs").rglob("*.out"))
    assert any("+ export WANDB_API_KEY" in log.read_text() for log in logs), logs  # the job read the key file
    assert key not in proc.stdout + proc.stderr
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and p != key_file and key.encode() in p.read_bytes()]
    assert leaks == [], f"the W&B key was written to {leaks}"


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


MEGATRON_SLURM = ["--smoke", "--backend", "megatron", *SHORT, "lora.dropout=0.0"]


@pytest.fixture(scope="module")
def megatron_slurm(cluster, tmp_path_factory, tiny_base):
    """The Megatron CPU smoke's import, data, cpt and cpt's export as Slurm jobs, the CPT on two gloo ranks in one
    node (cluster.gpus_per_node=2: data parallel 2), and the one-process CPT of the same spec in its group (the
    reference the multi-rank layouts equal). LoRA dropout 0: with dropout each rank draws masks for its own
    micro batches (test_megatron_multirank.py). import..export only: the whole chain on Slurm is
    test_stages_complete_in_dependency_order's (hf) and every Megatron stage is the local tier's."""
    from megatron_tier import run_in_own_group

    out = tmp_path_factory.mktemp("megatron_slurm")
    env = {**os.environ, "NEMO_HOME": str(out / "nemo_home"), "WANDB_MODE": "offline"}
    proc = subprocess.run([*EXPERIMENT, *MEGATRON_SLURM, "--wait", "--output-dir", str(out),
                           "--stages", "import,data,cpt,export", "cluster.gpus_per_node=2"],
                          capture_output=True, text=True, timeout=1800, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "4/4 tasks finished" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-3000:]
    run_dir = out / "smoke"
    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["cluster"]["gpus_per_node"] == 2 and spec["lora"]["dropout"] == 0.0
    spec.update(name="slurm-one-process", group=run_dir.name, stages=["cpt"])
    spec["cluster"]["gpus_per_node"] = 1
    spec_path = out / "one_process.json"
    spec_path.write_text(json.dumps(spec))
    one = run_in_own_group([sys.executable, "-m", "jp_peft.cli", "stage", "cpt", "--spec", str(spec_path)],
                           {**env, "WANDB_MODE": "disabled"})
    assert one.returncode == 0, one.stdout[-4000:] + one.stderr[-4000:]
    return out, proc, env


def _relative_differences_to_one_process(out: Path, run: str) -> dict:
    from megatron_tier import train_losses, val_losses

    got, ref = train_losses(out / run / "cpt"), train_losses(out / "slurm-one-process" / "cpt")
    assert sorted(got) == sorted(ref) == list(range(1, 9))  # every step once: rank 0 alone writes
    got_val, ref_val = val_losses(out / run / "cpt"), val_losses(out / "slurm-one-process" / "cpt")
    assert [row[0] for row in got_val] == [row[0] for row in ref_val] and len(ref_val) >= 2
    return {"loss": max(relative_difference(got[s], ref[s]) for s in ref),
            "val": max(relative_difference(g, r) for gr, rr in zip(got_val, ref_val) for g, r in zip(gr[1:], rr[1:]))}


def _stage_log(out: Path, run: str, stage: str, job: str) -> str:
    """Every log of one stage's job: the sbatch output and srun's per-attempt logs (launches/ of the run's
    group directory: a run in another run's group launches from there)."""
    logs = list(out.glob(f"*/launches/**/*{run}-{stage}_{job}*.out"))
    assert logs, list(out.glob("*/launches/**/*.out"))
    return "".join(path.read_text(errors="replace") for path in logs)


def test_megatron_cpu_smoke_runs_through_slurm_on_two_ranks_and_equals_one_process(megatron_slurm):
    """NeMo's real Megatron path on the CPU tier, as Slurm jobs: the CPT stage is one task on one node in which
    torchrun starts two gloo ranks, no GPU requested and a CPU per rank; afterok dependencies, the same records
    and parity checks as the local run. Its CPT trains what one process trains from the same spec: every
    training and validation loss within 1e-4 relative."""
    out, proc, _ = megatron_slurm
    jobs = submitted_jobs(proc.stdout)
    assert list(jobs) == ["smoke-import", "smoke-data", "smoke-cpt", "smoke-export-cpt"], list(jobs)
    assert [job_info(jobs[name])["JobState"] for name in jobs] == ["COMPLETED"] * 4
    run_dir = out / "smoke"
    info = job_info(jobs["smoke-cpt"])
    assert (info["NumNodes"], info["NumTasks"], info["NumCPUs"]) == ("1", "1", "2"), info
    assert "--nproc-per-node 2 " in Path(info["Command"]).read_text(), info["Command"]  # the sbatch script
    assert json.loads((run_dir / "cpt" / "metrics.json").read_text())["steps"] == 8
    checks = json.loads((run_dir / "cpt" / "export.json").read_text())["checks"]
    assert [c["check"] for c in checks] == ["trained_vs_nemo_merged", "nemo_merged_vs_hf_merged",
                                            "peft_adapter_vs_hf_merged"]
    assert all(c["ok"] is True and c["max_abs_diff"] <= 1e-4 for c in checks), checks
    log = _stage_log(out, "smoke", "cpt", jobs["smoke-cpt"])
    for rank in (0, 1):  # both ranks in the one node, each saying where it runs
        assert re.search(rf"cpt: rank {rank}/2 on node\d, node rank 0, local rank {rank}", log), log[-3000:]
    found = _relative_differences_to_one_process(out, "smoke")
    print(f"megatron slurm dp2 (one node, two ranks): relative differences against one process: {json.dumps(found)}")
    assert found["loss"] <= 1e-4 and found["val"] <= 1e-4, found


def test_megatron_cpt_on_two_nodes_equals_one_process(megatron_slurm):
    """cluster.num_nodes=2, one rank per node: the rendered sbatch asks for two nodes and runs torchrun on each
    (rendezvous at the head node); each node runs one of the two ranks, and
    the CPT equals the one-process CPT of the same spec within 1e-4 relative (data parallel 2 across nodes)."""
    out, _, env = megatron_slurm
    proc = subprocess.run([*EXPERIMENT, *MEGATRON_SLURM, "--wait", "--output-dir", str(out), "--stages", "cpt",
                           "--name", "two-nodes", "group=smoke", "cluster.num_nodes=2", "wandb.enabled=false"],
                          capture_output=True, text=True, timeout=1200, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    job = submitted_jobs(proc.stdout)["two-nodes-cpt"]
    info = job_info(job)
    assert (info["JobState"], info["NumNodes"], info["NumTasks"]) == ("COMPLETED", "2", "2"), info
    assert info["NodeList"] == "node[1-2]", info
    script = Path(info["Command"]).read_text()
    print("the two-node job's sbatch script:\n" + script)
    assert "#SBATCH --nodes=2" in script and "--nnodes 2 --nproc-per-node 1 --node-rank $SLURM_NODEID" in script
    log = _stage_log(out, "two-nodes", "cpt", job)
    # torchrun's c10d rendezvous numbers the nodes in the order they join (it ignores --node-rank), so rank 0
    # lands on either node (here it ran on node1, in CI on node2): what holds is one rank per node, node rank = rank.
    placements = sorted(set(re.findall(r"cpt: rank (\d)/2 on (node\d), node rank (\d), local rank 0", log)))
    print(f"two-node placements (rank, node, node rank): {placements}")
    assert sorted(rank for rank, _, _ in placements) == ["0", "1"], log[-3000:]
    assert sorted(node for _, node, _ in placements) == ["node1", "node2"], log[-3000:]
    assert all(rank == node_rank for rank, _, node_rank in placements), log[-3000:]
    found = _relative_differences_to_one_process(out, "two-nodes")
    print(f"megatron slurm two nodes x one rank: relative differences against one process: {json.dumps(found)}")
    assert found["loss"] <= 1e-4 and found["val"] <= 1e-4, found


def _processes_of_job_on_node(job: str, node_id: int) -> list[int]:
    """PIDs of the job's task processes on one node (their environment names the job and the node; slurmstepd
    itself has slurmd's environment, so it is never among them)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(item.split("=", 1) for item in environ.read_bytes().decode(errors="replace").split("\0")
                       if "=" in item)
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_NODEID") == str(node_id) and "SLURM_STEP_ID" in env:
            pids.append(int(environ.parent.name))
    return pids


@pytest.mark.slow  # a 2000-step two-node job killed midway: CI keeps the two-node equality above
def test_a_two_node_job_that_loses_a_node_fails_fast_with_its_log(megatron_slurm):
    """Every task process of node2 killed in the middle of a two-node CPT (what a node that dies does to its
    ranks): srun's --kill-on-bad-exit ends the other node's rank too and the job FAILS at once, not at its time
    limit and not requeued; the launcher says so and its log names the lost task."""
    out, _, env = megatron_slurm
    args = [*MEGATRON_SLURM, "--output-dir", str(out), "--stages", "cpt", "--name", "lost-node", "group=smoke",
            "cluster.num_nodes=2", "wandb.enabled=false", "cpt.train.max_steps=2000", "cpt.train.val_check_interval=1000"]
    launcher = subprocess.Popen([*EXPERIMENT, *args, "--wait"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    log = out / "lost-node" / "cpt" / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and launcher.poll() is None:
        if log.exists() and sum('"train/loss"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert launcher.poll() is None, launcher.communicate()
    squeue = subprocess.run(["squeue", "-h", "-n", "jp-peft.lost-node-cpt", "-o", "%i"], capture_output=True, text=True)
    job = squeue.stdout.split()[0]
    victims = _processes_of_job_on_node(job, 1)
    assert victims, f"no task process of job {job} on node2"
    killed_at = time.time()
    for pid in victims:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    stdout, stderr = launcher.communicate(timeout=300)
    info = job_info(job)
    ended = time.time() - killed_at
    print(f"lost node: job {job} {info['JobState']} {ended:.0f} s after node2's {len(victims)} processes were killed")
    assert launcher.returncode == 1, stdout[-3000:] + stderr[-3000:]
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    # "fast" against what a hung rank would cost: the job's time limit (local.yaml: 1 h), with a margin of 10
    hours, minutes, seconds = (int(x) for x in info["TimeLimit"].split(":"))
    assert ended < (3600 * hours + 60 * minutes + seconds) / 10, (ended, info["TimeLimit"])
    assert "FAILED: lost-node-cpt: FAILED" in stderr, stderr[-3000:]
    text = _stage_log(out, "lost-node", "cpt", job)
    assert re.search(r"node2: task 1: Killed|task 1 .*[Kk]illed", text), text[-3000:]


def test_a_failed_job_cancels_its_whole_chain_of_dependents_even_without_kill_invalid_depend(cluster, tmp_path):
    """Slurm's default (no kill_invalid_depend, asked for here per job) marks only a failed job's direct
    dependents DependencyNeverSatisfied and leaves the rest of the chain waiting on them for ever: the
    launcher's --wait waited its whole 24 h. A second, independent chain (another sweep variant) runs on."""
    def submit(*args):
        return subprocess.run(["sbatch", "--parsable", "--kill-on-invalid-dep=no", "-o", str(tmp_path / "%j.out"),
                               *args], capture_output=True, text=True, check=True).stdout.strip()

    jobs = {"a-cpt": submit("--wrap", "exit 1"), "b-cpt": submit("--wrap", "true")}
    depends_on = {"a-cpt": [], "b-cpt": []}
    for variant in ("a", "b"):
        for before, name in (("cpt", "export"), ("export", "sft")):
            jobs[f"{variant}-{name}"] = submit(f"--dependency=afterok:{jobs[f'{variant}-{before}']}", "--wrap", "true")
            depends_on[f"{variant}-{name}"] = [f"{variant}-{before}"]
    cancelled = []
    states = wait_for(jobs, timeout_s=120, poll_s=1, log=lambda *_: None, depends_on=depends_on,
                      on_cancel=cancelled.extend)
    assert {name: state for name, (state, _) in states.items()} == {
        "a-cpt": "FAILED", "a-export": "CANCELLED", "a-sft": "CANCELLED",
        "b-cpt": "COMPLETED", "b-export": "COMPLETED", "b-sft": "COMPLETED"}
    # --kill-on-invalid-dep=no: Slurm would have left a-sft pending (a-export never fails, it is cancelled);
    # that both are CANCELLED, and named by on_cancel, is the launcher's doing (no wall-clock bound needed)
    assert sorted(cancelled) == ["a-export", "a-sft"]
