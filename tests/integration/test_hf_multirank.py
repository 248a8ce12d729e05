"""The hf backend on two DDP ranks (gloo, CPU) trains what one process trains with gradient accumulation.

cluster.gpus_per_node=2 on the hf backend: torchrun starts two processes (as the local executor does for a
multi-rank stage, run/plan.py), Lightning's DDPStrategy joins them over gloo, and each rank trains its half
of the micro batches of every global batch (backends/hf/trainer.py training_step). The same global batch,
the same data order: the per-step training losses, the validation losses and the exported PEFT adapter
equal the one-process run's (smoke preset: 4 micro x 2 accumulation = 8 sequences a step; on 2 ranks 4 x 1
each; the test uses micro batch 2, so each rank accumulates 2). LoRA dropout 0: with dropout each rank draws masks for its own micro batches. What differs is the
order of floating-point sums (the gradient all-reduce, the loss reduction). Records, the W&B run and the
exports are written once, by rank 0. The stages run in the smoke run's group (its data and imported base).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.spec import load_preset, resolve_spec

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 4
TOLERANCE, ADAPTER_TOLERANCE = 1e-4, 1e-5


def _overrides(group_dir: Path, name: str, ranks: int) -> list[str]:
    return [f"output_dir={group_dir.parent}", f"name={name}", f"group={group_dir.name}", "stages=[cpt]",
            "wandb.enabled=false", "lora.dropout=0.0", f"cluster.gpus_per_node={ranks}", f"cpt.train.max_steps={MAX_STEPS}",
            "cpt.train.micro_batch_size=2", "cpt.train.warmup_steps=1", "cpt.train.val_check_interval=2",
            "cpt.train.ckpt_every_n_steps=2", "cpt.train.limit_val_batches=2"]


def _run(group_dir: Path, name: str, ranks: int) -> subprocess.CompletedProcess:
    """One process: the stage CLI. Two ranks: the experiment's local executor, which starts torchrun for a
    multi-rank stage (what a user runs)."""
    overrides = _overrides(group_dir, name, ranks)
    if ranks == 1:
        command = ["-m", "jp_peft.cli", "stage", "cpt", "--spec", str(_spec_file(overrides, group_dir.parent / f"{name}.json"))]
    else:
        command = [str(REPO / "experiments/qwen_lora_ja.py"), "--executor", "local", "--smoke", *overrides]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def _spec_file(overrides: list[str], path: Path) -> Path:
    path.write_text(json.dumps(resolve_spec(load_preset("smoke"), overrides).to_dict()))
    return path


def _rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.fixture(scope="module")
def one_and_two_ranks(smoke_run):
    group_dir = smoke_run[0]
    done = {}
    for name, ranks in (("hf_one", 1), ("hf_dp2", 2)):
        proc = _run(group_dir, name, ranks)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        done[name] = (group_dir.parent / name / "cpt", proc)
    return done


def test_two_ddp_ranks_train_what_one_process_trains(one_and_two_ranks):
    from safetensors.torch import load_file

    (one, _), (dp2, _) = one_and_two_ranks["hf_one"], one_and_two_ranks["hf_dp2"]
    ref = {r["trainer/global_step"]: r for r in _rows(one) if "train/loss" in r}
    got_rows = [r for r in _rows(dp2) if "train/loss" in r]
    assert [r["trainer/global_step"] for r in got_rows] == list(range(1, MAX_STEPS + 1))  # each step once: rank 0
    got = {r["trainer/global_step"]: r for r in got_rows}
    # the whole global batch's tokens and samples, as one process counts them
    assert all(got[s]["perf/consumed_tokens"] == ref[s]["perf/consumed_tokens"] for s in ref)
    # the hf backend keeps its validation rows in metrics.json (val_history) and the W&B run
    ref_val, got_val = ([[r[k] for k in ("val/ja_loss", "val/en_loss")]
                         for r in json.loads((path / "metrics.json").read_text())["val_history"]] for path in (one, dp2))
    assert len(got_val) == len(ref_val) >= 2, (got_val, ref_val)
    a, b = load_file(dp2 / "hf_adapter" / "adapter_model.safetensors"), load_file(one / "hf_adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in b.values())
    found = {"loss": max(_relative(got[s]["train/loss"], ref[s]["train/loss"]) for s in ref),
             "val": max(_relative(g, r) for gr, rr in zip(got_val, ref_val) for g, r in zip(gr, rr)),
             "adapter": max(float((a[k] - b[k]).abs().max()) for k in a) / scale}
    print(f"hf dp2: relative differences against one process: {json.dumps(found)}")
    assert found["loss"] <= TOLERANCE and found["val"] <= TOLERANCE and found["adapter"] <= ADAPTER_TOLERANCE, found
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained


def test_two_ddp_ranks_write_each_record_once_and_export_what_they_trained(one_and_two_ranks):
    dp2, proc = one_and_two_ranks["hf_dp2"]
    spec = dp2.parent / "spec.json"  # the launcher's resolved spec
    metrics = json.loads((dp2 / "metrics.json").read_text())
    assert metrics["steps"] == MAX_STEPS and metrics["backend"] == "hf"
    # each rank says where it runs, in the stage's log (the launcher prints rank 0's progress only)
    log = "".join(path.read_text() for path in dp2.parent.parent.glob("smoke/launches/experiments/hf_dp2-cpt/**/combined.log"))
    for rank in (0, 1):
        assert f"cpt: rank {rank}/2 on " in log and f", local rank {rank}" in log, log[-3000:]
    assert log.count("cpt step 4/4 loss") == 1  # progress printed once, by rank 0
    # the export stage's checks hold for what rank 0 exported (the adapter on the base, the merged model)
    export = subprocess.run([sys.executable, "-m", "jp_peft.cli", "stage", "export", "--target", "cpt", "--spec",
                             str(spec)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    checks = json.loads((dp2 / "export.json").read_text())["checks"]
    assert [c["check"] for c in checks] == ["hf_merged_vs_trained", "peft_adapter_vs_hf_merged"], checks
    assert all(c["ok"] for c in checks), checks
