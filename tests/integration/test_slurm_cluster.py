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


def test_megatron_cpu_smoke_runs_through_slurm_on_two_ranks_and_equals_one_process(cluster, tmp_path, tiny_base):
    """NeMo's real Megatron path on the CPU tier, as Slurm jobs: the CPT stage is one task on one node in which
    torchrun starts two gloo ranks (cluster.gpus_per_node=2: data parallel 2), no GPU requested and a CPU per
    rank; afterok dependencies, the same records and parity checks as the local run. import, data, cpt and
    cpt's export only: the whole chain on Slurm is test_stages_complete_in_dependency_order's (hf) and every
    Megatron stage is the local tier's, so this adds what only it proves, in a third of the time. Its CPT trains what
    one process trains from the same spec (run here, the CPT stage only, in the run's group): every training and
    validation loss within 1e-4 relative. LoRA dropout 0: with dropout each rank draws masks for its own micro
    batches (test_megatron_multirank.py)."""
    from megatron_tier import run_in_own_group, train_losses, val_losses

    env = {**os.environ, "NEMO_HOME": str(tmp_path / "nemo_home"), "WANDB_MODE": "offline"}
    proc = subprocess.run([*EXPERIMENT, "--smoke", "--backend", "megatron", "--wait", "--output-dir", str(tmp_path),
                           "--stages", "import,data,cpt,export", *SHORT, "cluster.gpus_per_node=2", "lora.dropout=0.0"],
                          capture_output=True, text=True, timeout=1800, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    jobs = submitted_jobs(proc.stdout)
    assert list(jobs) == ["smoke-import", "smoke-data", "smoke-cpt", "smoke-export-cpt"], list(jobs)
    assert [job_info(jobs[name])["JobState"] for name in jobs] == ["COMPLETED"] * 4
    run_dir = tmp_path / "smoke"
    for stage, steps in (("cpt", 8),):
        info = job_info(jobs[f"smoke-{stage}"])
        assert (info["NumNodes"], info["NumTasks"], info["NumCPUs"]) == ("1", "1", "2"), info
        assert "--nproc-per-node 2 " in Path(info["Command"]).read_text(), info["Command"]  # the sbatch script
        assert json.loads((run_dir / stage / "metrics.json").read_text())["steps"] == steps
        checks = json.loads((run_dir / stage / "export.json").read_text())["checks"]
        assert [c["check"] for c in checks] == ["trained_vs_nemo_merged", "nemo_merged_vs_hf_merged",
                                                "peft_adapter_vs_hf_merged"]
        assert all(c["ok"] is True and c["max_abs_diff"] <= 1e-4 for c in checks), checks
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["backend"] == "megatron" and summary["stages"][0]["ja_ppl_after"] < summary["stages"][0]["ja_ppl_before"]

    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["cluster"]["gpus_per_node"] == 2 and spec["lora"]["dropout"] == 0.0
    spec.update(name="slurm-one-process", group=run_dir.name, stages=["cpt"])
    spec["cluster"]["gpus_per_node"] = 1
    spec_path = tmp_path / "one_process.json"
    spec_path.write_text(json.dumps(spec))
    one = run_in_own_group([sys.executable, "-m", "jp_peft.cli", "stage", "cpt", "--spec", str(spec_path)],
                           {**env, "WANDB_MODE": "disabled"})
    assert one.returncode == 0, one.stdout[-4000:] + one.stderr[-4000:]
    got, ref = train_losses(run_dir / "cpt"), train_losses(tmp_path / "slurm-one-process" / "cpt")
    assert sorted(got) == sorted(ref) == list(range(1, 9))  # every step once: rank 0 alone writes
    got_val, ref_val = val_losses(run_dir / "cpt"), val_losses(tmp_path / "slurm-one-process" / "cpt")
    assert [row[0] for row in got_val] == [row[0] for row in ref_val] and len(ref_val) >= 2
    found = {"loss": max(relative_difference(got[s], ref[s]) for s in ref),
             "val": max(relative_difference(g, r) for gr, rr in zip(got_val, ref_val) for g, r in zip(gr[1:], rr[1:]))}
    print(f"megatron slurm dp2: relative differences against one process: {json.dumps(found)}")
    assert found["loss"] <= 1e-4 and found["val"] <= 1e-4, found


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
