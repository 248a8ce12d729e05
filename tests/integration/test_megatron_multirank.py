"""NeMo's real Megatron engine on several gloo ranks (CPU) trains what one process trains.

Each "GPU" of cluster.gpus_per_node is a CPU process that torchrun starts, as the local executor does for a
multi-rank stage (run/plan.py); the collectives run on gloo. The runs are CPT stages, siblings in the
Megatron tier's group (conftest.megatron_run), with the same global batch as the one-process reference:
  data parallel 2 (the distributed optimizer shards its state over the two ranks), tensor parallel 2 (slow;
  CI trains TP2 in the resharded case), and TP2 x DP2 on 4 ranks (slow: 4 processes on 2 cores);
  a CPT stopped at TP2 after a checkpoint and resumed in one process (the torch_dist checkpoint loaded with
  another layout), and a DP2 one resumed at TP2 (slow).
Equal within TOLERANCE (relative) in every training and validation loss, and the PEFT adapters NeMo's
exporter writes from each run's last checkpoint within ADAPTER_TOLERANCE. LoRA dropout is 0 here: with
dropout each rank draws masks for its own micro batches, so layouts are equal in distribution, not per step.
What still differs is the order of floating-point sums: gradients all-reduced over DP ranks, partial matmul
outputs all-reduced over TP ranks, the vocabulary-parallel cross entropy. Every record (train_log.jsonl,
metrics.json) is written once, by rank 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from megatron_tier import export_adapters, run_in_own_group, train_losses, val_losses

pytestmark = [pytest.mark.megatron_cpu]
MAX_STEPS, STOP_STEP = 4, 2
TOLERANCE, ADAPTER_TOLERANCE = 1e-4, 1e-5

# Every rank stops right after the `-last` checkpoint of STOP_STEP is written: a barrier (every rank's shard
# is on disk), then SIGKILL, as a node failure would; torchrun then ends the stage.
STOP_AFTER_CHECKPOINT = """
import os, signal, sys
import torch.distributed as dist
from nemo.lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint
from jp_peft.cli import main

save_checkpoint = ModelCheckpoint._save_checkpoint

def then_stop(self, trainer, filepath, *args, **kwargs):
    save_checkpoint(self, trainer, filepath, *args, **kwargs)
    name = str(filepath).removesuffix(".ckpt")
    if name.endswith("-last") and f"-step={int(os.environ['JP_PEFT_TEST_STOP_STEP']) - 1}-" in name:
        if dist.is_initialized():
            dist.barrier()
        print("test hook: checkpoint written, stopping", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

ModelCheckpoint._save_checkpoint = then_stop
if __name__ == "__main__":  # a script here: the checkpoint writer's spawned helpers import it again
    sys.exit(main(sys.argv[1:]))
"""

LAYOUTS = {"one": {}, "dp2": {"gpus_per_node": 2}, "tp2": {"gpus_per_node": 2, "tensor_parallel": 2},
           "tp2dp2": {"gpus_per_node": 4, "tensor_parallel": 2}}


def layout_spec(run_dir: Path, name: str, layout: str, tmp: Path) -> Path:
    spec = json.loads((run_dir / "spec.json").read_text())
    spec.update(name=name, group=run_dir.name, stages=["cpt"])
    spec["cpt"]["train"].update(max_steps=MAX_STEPS, warmup_steps=1, val_check_interval=2, ckpt_every_n_steps=2,
                                limit_val_batches=2)
    spec["lora"]["dropout"] = 0.0
    spec["cluster"].update({"gpus_per_node": 1, "tensor_parallel": 1, **LAYOUTS[layout]})
    path = tmp / f"{name}-{layout}.json"
    path.write_text(json.dumps(spec))
    return path


def run_cpt(spec: Path, env: dict, stop: bool = False):
    """The stage as the local executor runs it: one process, or torchrun with one process per "GPU"."""
    ranks = json.loads(spec.read_text())["cluster"]["gpus_per_node"]
    program = ["-c", STOP_AFTER_CHECKPOINT] if stop else ["-m", "jp_peft.cli"]
    if ranks > 1:
        # torchrun runs a script or a module; the hook is a script
        if stop:
            hook = spec.with_suffix(".hook.py")
            hook.write_text(STOP_AFTER_CHECKPOINT)
            program = [str(hook)]
        program = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *program]
    env = {**env, "WANDB_MODE": "disabled", "JP_PEFT_TEST_STOP_STEP": str(STOP_STEP)}
    return run_in_own_group([sys.executable, *program, "stage", "cpt", "--spec", str(spec)], env)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def differences(run: Path, reference: Path) -> dict:
    ref, got = train_losses(reference), train_losses(run)
    assert sorted(got) == sorted(ref) == list(range(1, MAX_STEPS + 1))  # every step once: rank 0 alone writes
    ref_val, got_val = val_losses(reference), val_losses(run)
    assert [row[0] for row in got_val] == [row[0] for row in ref_val] == [0, 2, 4]
    return {"loss": max(relative_difference(got[s], ref[s]) for s in ref),
            "val": max(relative_difference(g, r) for gr, rr in zip(got_val, ref_val) for g, r in zip(gr[1:], rr[1:]))}


def adapter_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


@pytest.fixture(scope="module")
def runs(megatron_run, tmp_path_factory):
    """Trained CPT stages by name, run once each (the reference first)."""
    run_dir, _, env = megatron_run
    tmp = tmp_path_factory.mktemp("multirank")
    done = {}

    def trained(name: str, layout: str) -> Path:
        if name not in done:
            proc = run_cpt(layout_spec(run_dir, name, layout, tmp), env)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            done[name] = run_dir.parent / name / "cpt"
        return done[name]

    return run_dir, env, tmp, trained


def check_equal(runs, stage_dir: Path, label: str, tmp: Path):
    _, env, _, trained = runs
    reference = trained("mrank_one", "one")
    found = differences(stage_dir, reference)
    adapters = export_adapters({"reference": reference, label: stage_dir}, tmp / "adapters", env)
    found["adapter"] = adapter_difference(adapters[label], adapters["reference"])
    print(f"megatron {label}: relative differences against one process: {json.dumps(found)}")
    assert found["loss"] <= TOLERANCE and found["val"] <= TOLERANCE, found
    assert found["adapter"] <= ADAPTER_TOLERANCE, found
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS
    assert any(float(v.abs().max()) > 0 for k, v in adapters[label].items() if "lora_B" in k)  # it trained
    return found, metrics


# CI runs dp2 and, through the resharded case below, two TP2 steps; the rest is `slow` (make test-all)
@pytest.mark.parametrize("layout", ["dp2", pytest.param("tp2", marks=pytest.mark.slow),
                                    pytest.param("tp2dp2", marks=pytest.mark.slow)])
def test_layout_equals_one_process(runs, layout, tmp_path):
    stage_dir = runs[3](f"mrank_{layout}", layout)
    _, metrics = check_equal(runs, stage_dir, layout, tmp_path)
    # the model is the same whatever the layout: every rank's parameters counted (NeMo's module is one shard)
    assert metrics["trainable_params"] > 0


@pytest.mark.parametrize("first,then", [("tp2", "one"), pytest.param("dp2", "tp2", marks=pytest.mark.slow)])
def test_stopped_layout_resumes_resharded(runs, first, then, tmp_path):
    """A job that comes back with another layout (fewer GPUs, another split) continues the same run."""
    run_dir, env, tmp, _ = runs
    name = f"mrank_{first}_then_{then}"
    stopped = run_cpt(layout_spec(run_dir, name, first, tmp_path), env, stop=True)
    assert stopped.returncode != 0 and "checkpoint written, stopping" in stopped.stdout, stopped.stdout[-3000:]
    stage_dir = run_dir.parent / name / "cpt"
    assert max(train_losses(stage_dir)) == STOP_STEP and not (stage_dir / "metrics.json").exists()
    resumed = run_cpt(layout_spec(run_dir, name, then, tmp_path), env)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert f"-step={STOP_STEP - 1}-" in metrics["resumed_from"], metrics
    check_equal(runs, stage_dir, f"{first}_then_{then}", tmp_path)


@pytest.mark.slow  # two more CPT runs; CI keeps dp2 and the resharded TP2 case
def test_early_stopping_on_two_ranks_stops_every_rank_where_one_process_stops(runs, tmp_path):
    """A crafted curve (min_delta 100: the first validation, at step 2, is the best there will be; patience 1)
    stops one process at step 4 of 8; on DP2 both ranks stop there too, decided from rank 0's broadcast
    validation loss (LanguageValidation), so no rank waits in a collective the other never reaches: the stage
    ends, exit 0, well inside its timeout."""
    run_dir, env, _, _ = runs
    stopped = {}
    for layout in ("one", "dp2"):
        spec_path = layout_spec(run_dir, f"mrank_early_{layout}", layout, tmp_path)
        spec = json.loads(spec_path.read_text())
        spec["cpt"]["train"].update(max_steps=8, early_stopping_patience=1, early_stopping_min_delta=100.0)
        spec_path.write_text(json.dumps(spec))
        proc = run_cpt(spec_path, env)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        stage_dir = run_dir.parent / f"mrank_early_{layout}" / "cpt"
        metrics = json.loads((stage_dir / "metrics.json").read_text())
        assert [row[0] for row in val_losses(stage_dir)] == [0, 2, 4]
        stopped[layout] = (metrics["steps"], metrics["early_stopped_at_step"], sorted(train_losses(stage_dir)))
        assert "at step 2" in metrics["stop_reason"], metrics["stop_reason"]
    assert stopped["dp2"] == stopped["one"] == (4, 4, [1, 2, 3, 4]), stopped


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_a_two_rank_stage_saves_every_shard_and_the_resume_equals_one_process(runs, sig, tmp_path):
    """Ctrl-C (or SIGTERM) to the launcher of a DP2 CPT, as a user sends it: the local executor's torchrun
    passes it to both ranks, which save their shards of a `-last` checkpoint at the end of the step they are in
    and exit; the launcher exits 130, no process of the run is left, and the same command resumes the stage to
    its end with every loss equal to the one-process run of the same spec (within TOLERANCE)."""
    import subprocess
    import time

    run_dir, env, _, _ = runs
    name = f"mrank_signal_{sig.name.lower()}"
    overrides = ["--stages", "cpt", "--output-dir", str(run_dir.parent), "--name", name, f"group={run_dir.name}",
                 "--no-wandb", "lora.dropout=0.0", "cluster.gpus_per_node=2", "cpt.train.max_steps=12",
                 "cpt.train.warmup_steps=1", "cpt.train.val_check_interval=6", "cpt.train.ckpt_every_n_steps=100",
                 "cpt.train.limit_val_batches=2"]
    command = [sys.executable, str(Path(__file__).resolve().parents[2] / "experiments/qwen_lora_ja.py"),
               "--executor", "local", "--smoke", "--backend", "megatron", *overrides]
    launcher = subprocess.Popen(command, cwd=run_dir.parent, env={**env, "WANDB_MODE": "disabled"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = run_dir.parent / name / "cpt" / "train_log.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and launcher.poll() is None:
        if log.exists() and sum('"train/loss"' in line for line in log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    launcher.send_signal(sig)
    sent = time.time()
    output = launcher.communicate(timeout=300)[0]
    print(f"two-rank stage, {sig.name}: launcher exit {launcher.returncode} {time.time() - sent:.0f} s after the signal")
    assert launcher.returncode == 130, output[-3000:]
    assert "Resume with the same command" in output, output[-3000:]
    stage_dir = run_dir.parent / name / "cpt"
    saved = sorted(p.name for p in (stage_dir / "nemo" / "checkpoints").glob("*-last"))
    assert len(saved) == 1 and not (stage_dir / "metrics.json").exists(), saved
    time.sleep(1)
    left = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert [line for line in left.splitlines() if f"--name {name}" in line or f"/{name}/" in line] == []

    resumed = subprocess.run(command, cwd=run_dir.parent, env={**env, "WANDB_MODE": "disabled"}, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["resumed_from"], metrics
    one = layout_spec(run_dir, f"{name}_one", "one", tmp_path)
    spec = json.loads(one.read_text())
    spec["cpt"]["train"].update(max_steps=12, val_check_interval=6, ckpt_every_n_steps=100)
    one.write_text(json.dumps(spec))
    assert run_cpt(one, env).returncode == 0
    got, ref = train_losses(stage_dir), train_losses(run_dir.parent / f"{name}_one" / "cpt")
    assert sorted(got) == sorted(ref) == list(range(1, 13))
    found = max(relative_difference(got[s], ref[s]) for s in ref)
    print(f"two-rank stage stopped by {sig.name} and resumed: loss relative difference against one process {found:.2e}")
    assert found <= TOLERANCE
