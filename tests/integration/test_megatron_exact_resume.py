"""A stopped Megatron-backend stage (NeMo's real engine on CPU) resumed by the same command trains exactly what
an uninterrupted run trains: CPT and SFT, each stopped by SIGKILL, SIGTERM and SIGINT right after a checkpoint.

The CI tier has one case (test_megatron_cpu_smoke: CPT, SIGTERM during training). This module is the whole
grid, behind `slow` (about 30 minutes on 2 cores): `make test-all`. Its group trains CPT and SFT for two
steps only to prepare their data; each run below is one stage (SFT starts from the imported base, as a spec
without CPT does).
The stop is deterministic, as in test_exact_resume.py: NeMo's checkpoint
callback's save (nemo/lightning/pytorch/callbacks/model_checkpoint.py ModelCheckpoint._save_checkpoint, which
NeMo calls at the validation of a checkpoint step) is wrapped so that the process signals itself right after
the `-last` checkpoint of step STOP_STEP is written (synchronous on CPU: ckpt_async_save=False).
  SIGKILL: the process dies there (a node failure); the rerun resumes from step STOP_STEP.
  SIGTERM: NeMo's PreemptionCallback saves at the end of the next step and stops (StageInterrupted, exit 3).
  SIGINT:  Ctrl-C: Lightning's graceful shutdown (exit 3, as SIGTERM); the rerun resumes from step STOP_STEP.
Equality is bit for bit: == on the logged training and validation losses, torch.equal on every tensor of
the PEFT adapter NeMo's exporter writes from each run's last checkpoint. LoRA dropout 0.1 (the presets') on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from megatron_tier import export_adapters, run_in_own_group, train_losses, val_losses

pytestmark = [pytest.mark.megatron_cpu, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, STOP_STEP = 8, 4

STOP_AT_CHECKPOINT = """
import os, signal, sys
from nemo.lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint
from jp_peft.cli import main

stop_step, signum = int(os.environ["JP_PEFT_TEST_STOP_STEP"]), int(os.environ["JP_PEFT_TEST_STOP_SIGNAL"])
# Ctrl-C as a terminal's foreground job gets it: a job a shell started in the background inherits SIGINT
# ignored, and Python keeps an ignored SIGINT ignored (the stage would train on)
signal.signal(signal.SIGINT, signal.default_int_handler)
save_checkpoint = ModelCheckpoint._save_checkpoint

def then_stop(self, trainer, filepath, *args, **kwargs):
    save_checkpoint(self, trainer, filepath, *args, **kwargs)  # synchronous on CPU: finished when it returns
    # NeMo names a checkpoint by the 0-based index of its last step (step=3 holds 4), with or without ".ckpt"
    name = str(filepath).removesuffix(".ckpt")
    if name.endswith("-last") and f"-step={stop_step - 1}-" in name:
        print(f"test hook: checkpoint of step {stop_step} written, sending signal {signum}", flush=True)
        os.kill(os.getpid(), signum)

ModelCheckpoint._save_checkpoint = then_stop
sys.exit(main(sys.argv[1:]))
"""

STOPS = {  # signal: (exit status of the stopped process, the step its newest checkpoint holds)
    signal.SIGKILL: (-signal.SIGKILL, STOP_STEP),
    signal.SIGTERM: (3, STOP_STEP + 1),
    # Lightning's KeyboardInterrupt shutdown ends in exit(1) (lightning/pytorch/trainer/call.py:64); the stage
    # sees the SystemExit before its last step and says how to resume (StageInterrupted, exit 3)
    signal.SIGINT: (3, STOP_STEP),
}

def stage_spec(run_dir: Path, stage: str, name: str, tmp: Path) -> Path:
    spec = json.loads((run_dir / "spec.json").read_text())
    spec.update(name=name, group=run_dir.name, stages=[stage])
    spec[stage]["train"].update(max_steps=MAX_STEPS, val_check_interval=4, ckpt_every_n_steps=4, limit_val_batches=2)
    assert spec["lora"]["dropout"] == 0.1  # the point: dropout on, as the presets have it
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def run_stage(stage: str, spec: Path, env: dict, stop: signal.Signals | None = None) -> subprocess.CompletedProcess:
    env = {**env, "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "jp_peft.cli"]
    if stop is not None:
        command = [sys.executable, "-c", STOP_AT_CHECKPOINT]
        env.update(JP_PEFT_TEST_STOP_STEP=str(STOP_STEP), JP_PEFT_TEST_STOP_SIGNAL=str(int(stop)))
    return run_in_own_group([*command, "stage", stage, "--spec", str(spec)], env)


@pytest.fixture(scope="module")
def megatron_group(tmp_path_factory, tiny_base):
    """import and data on the Megatron backend, once: every run below is a sibling in this group."""
    from megatron_tier import megatron_experiment

    out = tmp_path_factory.mktemp("megatron_resume_runs")
    env = {**os.environ, "WANDB_MODE": "disabled", "NEMO_HOME": str(tmp_path_factory.mktemp("nemo_home"))}
    # cpt and sft for two steps each: the data stage prepares what the spec's trained stages read (and
    # Megatron's SFT restores the merged checkpoint CPT's export writes)
    short = [f"{stage}.train.{key}={value}" for stage in ("cpt", "sft") for key, value in
             (("max_steps", 2), ("warmup_steps", 1), ("val_check_interval", 2), ("limit_val_batches", 1),
              ("ckpt_every_n_steps", 2))]
    proc = megatron_experiment("--output-dir", str(out), "--stages", "import,data,cpt,export,sft", "--no-wandb", *short,
                               env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return out / "smoke", proc.stdout, env


@pytest.fixture(scope="module")
def uninterrupted(megatron_group, tmp_path_factory):
    run_dir, _, env = megatron_group
    tmp = tmp_path_factory.mktemp("megatron_exact_resume")
    done = {}

    def reference(stage: str) -> Path:
        if stage not in done:
            proc = run_stage(stage, stage_spec(run_dir, stage, f"mexact_ref_{stage}", tmp), env)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            done[stage] = run_dir.parent / f"mexact_ref_{stage}" / stage
        return done[stage]

    return reference


@pytest.mark.parametrize("stage,stop", [(stage, stop) for stage in ("cpt", "sft")
                                        for stop in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)],
                         ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_stopped_megatron_stage_resumes_bit_for_bit(megatron_group, uninterrupted, tmp_path, stage, stop):
    import torch

    run_dir, _, env = megatron_group
    reference = uninterrupted(stage)
    name = f"mexact_{stage}_{stop.name.lower()}"
    spec = stage_spec(run_dir, stage, name, tmp_path)
    stage_dir = run_dir.parent / name / stage

    stopped = run_stage(stage, spec, env, stop=stop)
    status, held_step = STOPS[stop]
    assert stopped.returncode == status, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert f"checkpoint of step {STOP_STEP} written" in stopped.stdout
    if status == 3:  # interrupted, not failed: the stage says how to go on
        assert "run the same command again to resume" in stopped.stdout + stopped.stderr
    assert not (stage_dir / "metrics.json").exists()  # the stage did not finish
    assert max(train_losses(stage_dir)) >= STOP_STEP

    resumed = run_stage(stage, spec, env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] and metrics["steps"] == MAX_STEPS
    # NeMo names a checkpoint by the 0-based index of its last step: step=3 holds 4 steps
    assert f"-step={held_step - 1}-" in metrics["resumed_from"], metrics

    ref, got = train_losses(reference), train_losses(stage_dir)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    loss_diff = max(abs(ref[s] - got[s]) for s in ref)
    assert val_losses(stage_dir) == val_losses(reference)

    a, b = export_adapters({"reference": reference, "resumed": stage_dir}, tmp_path / "adapters", env).values()
    adapter_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"megatron {stage} {stop.name}: largest loss difference {loss_diff:.3g}, adapter {adapter_diff:.3g}")
    assert got == ref, f"losses differ by up to {loss_diff:.3g}"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"adapter differs by {adapter_diff:.3g}"
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # the adapter did train
