"""The dpo stage through the real CLI, from the shared smoke run's SFT result (no CPT/SFT of its own): the
bundled preference sample prepared by `jp-peft data prepare --format preference`, TRL's DPOTrainer on the tiny
model for a few steps, the export's parity checks, the eval stage scoring dpo beside base and sft, and a bad
prepared file named file:line at plan time.

Kept to seconds of training: 8 steps of 4 pairs of at most 128 tokens, validations at 0, 4 and 8 on 16 pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.spec import load_preset, resolve_spec

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DPO_OVERRIDES = ["dpo.train.max_steps=8", "dpo.train.val_check_interval=4", "dpo.train.limit_val_batches=4",
                 "dpo.train.ckpt_every_n_steps=4", "dpo.train.global_batch_size=4", "dpo.train.micro_batch_size=4",
                 "dpo.train.warmup_steps=1", "dpo.data.seq_length=128", "dpo.train.lr=5e-3"]


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", *args], capture_output=True, text=True, timeout=900,
                          env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _prepare_pairs(tmp: Path, tokenizer: Path) -> dict[str, Path]:
    paths = {}
    for split in ("train", "validation"):
        _cli("data", "prepare", "--format", "preference", "--input", str(REPO / f"data/ja/dpo_pref.{split}.jsonl"),
             "--tokenizer", str(tokenizer), "--output-prefix", str(tmp / f"pairs_{split}"), "--no-progress")
        paths[split] = tmp / f"pairs_{split}" / "training.jsonl"
    return paths


def _spec(run_dir: Path, name: str, tmp: Path, pairs: dict[str, Path], *overrides: str) -> Path:
    """A run in the smoke group whose stages are sft (already trained: copied from the smoke run), dpo, export."""
    spec = resolve_spec(load_preset("smoke"), [
        f"output_dir={run_dir.parent}", f"name={name}", "group=smoke", "stages=[sft,dpo,export,eval]",
        f"dpo.data.train={pairs['train']}", f"dpo.data.validation={pairs['validation']}", *DPO_OVERRIDES,
        "eval.tasks_ja=[jpeft_jcqa]", "eval.tasks_en=[]", "eval.limit=4", "eval.generation=false", *overrides])
    for item in ("hf_merged", "hf_adapter", "export.json", "metrics.json"):  # the smoke run's SFT, as this run's
        source, target = run_dir / "sft" / item, spec.run_dir / "sft" / item
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    record = spec.run_dir / "sft" / "export.json"  # its artifacts here: the eval stage rewrites their cards
    record.write_text(record.read_text().replace(str(run_dir / "sft"), str(spec.run_dir / "sft")))
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec.to_dict()))
    shutil.copy(path, spec.run_dir / "spec.json")  # what the experiment script writes (compare reads it)
    return path


def _held_out_loss(model_dir: Path, prefix: str, seq: int, blocks: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from jp_peft.data.blocks import EvalBlocks

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    data = EvalBlocks(prefix, seq, blocks)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            logits = model(input_ids=item["input_ids"][None]).logits[0]
            n = int((item["labels"] != -100).sum())
            total += float(torch.nn.functional.cross_entropy(logits, item["labels"], ignore_index=-100)) * n
            count += n
    return total / count


@pytest.fixture(scope="module")
def dpo_run(smoke_run, tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    pairs = _prepare_pairs(tmp, tiny_base)
    spec = _spec(smoke_run[0], "dpo_run", tmp, pairs)
    trained = _cli("stage", "dpo", "--spec", str(spec))
    exported = _cli("stage", "export", "--target", "dpo", "--spec", str(spec))
    return smoke_run[0].parent / "dpo_run", trained.stdout, exported.stdout, spec, pairs


def test_dpo_raises_validation_reward_accuracy_above_its_step_0_value(dpo_run):
    out, stdout, _, _, _ = dpo_run
    metrics = json.loads((out / "dpo" / "metrics.json").read_text())
    extra = metrics["extra"]
    print(f"reward accuracy {extra['reward_accuracy_before']} -> {extra['reward_accuracy_after']}, margin "
          f"{extra['reward_margin_before']} -> {extra['reward_margin_after']}")
    # step 0: the policy is the reference (the LoRA B matrices are zero), every reward 0
    assert extra["reward_accuracy_before"] == 0.0 and extra["reward_margin_before"] == 0.0
    assert extra["reward_accuracy_after"] > extra["reward_accuracy_before"]
    # the margin is reported, not asserted: after 8 steps of 4 pairs its sign still varies with the seed
    # (measured -0.0128 with accuracy 0.5625, +0.0447 with accuracy 0.5, before per-step seeding)
    assert metrics["val_history"][-1]["val/dpo_reward_margin"] == extra["reward_margin_after"]
    assert [r["trainer/global_step"] for r in metrics["val_history"]] == [0, 4, 8]
    assert all({"val/dpo_reward_accuracy", "val/dpo_reward_margin", "val/ja_loss", "val/en_loss"} <= set(r)
               for r in metrics["val_history"])
    assert metrics["steps"] == 8 and metrics["tokens_per_second"] > 0 and metrics["method"] == "lora"
    # it started from the SFT model: its "before" losses are the SFT model's on the same held-out blocks
    assert metrics["base_model"] == str((out / "sft" / "hf_merged").resolve())
    spec = json.loads((out / "spec.json").read_text())["dpo"]
    assert metrics["base_val_loss_ja"] == pytest.approx(
        _held_out_loss(out / "sft" / "hf_merged", spec["data"]["val_ja"], spec["data"]["seq_length"],
                       spec["train"]["limit_val_batches"] * spec["train"]["micro_batch_size"]), rel=1e-5)
    rows = [json.loads(line) for line in (out / "dpo" / "train_log.jsonl").read_text().splitlines()]
    assert [r["trainer/global_step"] for r in rows if "train/loss" in r] == list(range(1, 9))
    assert "[jp-peft] dpo step 8/8 loss" in stdout and "reward accuracy" in stdout


def test_the_dpo_export_passes_its_parity_checks_on_the_sft_base(dpo_run):
    out, _, exported, _, _ = dpo_run
    record = json.loads((out / "dpo" / "export.json").read_text())
    assert [c["check"] for c in record["checks"]] == ["hf_merged_vs_trained", "peft_adapter_vs_hf_merged"]
    assert all(c["ok"] for c in record["checks"]), record["checks"]
    print("parity:", {c["check"]: c["max_abs_diff"] for c in record["checks"]})
    config = json.loads((out / "dpo" / "hf_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "sft" / "hf_merged").resolve())  # adapter on sft
    assert record["adapter_base"] == config["base_model_name_or_path"]
    card = (out / "dpo" / "hf_adapter" / "README.md").read_text()
    assert "preference tuning (DPO" in card and "reward accuracy on the validation pairs" in card


def test_the_dpo_run_logs_to_wandb_with_the_stage_identity(dpo_run):
    out = dpo_run[0]
    run_id = (out / "dpo" / "wandb_run_id.txt").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, runs


def test_eval_scores_dpo_beside_base_and_sft(dpo_run):
    out, _, _, spec, _ = dpo_run
    _cli("stage", "eval", "--spec", str(spec))
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"base", "sft", "dpo"} <= set(results["models"])
    summary = json.loads((out / "summary.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == ["sft", "dpo"]


def test_a_bad_prepared_pair_file_is_named_at_plan_time(dpo_run, tmp_path):
    out, _, _, _, pairs = dpo_run
    bad = tmp_path / "bad.jsonl"
    lines = pairs["train"].read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([lines[0], '{"prompt": "q", "chosen": 1, "rejected": "r"}']) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(REPO / "experiments/qwen_lora_ja.py"), "--smoke", "--dryrun",
                           "--output-dir", str(out.parent), "--stages", "dpo", f"dpo.data.train={bad}",
                           f"dpo.data.validation={pairs['validation']}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: dpo.data.train: {bad}:2: chosen missing or not a string")
    assert "Traceback" not in proc.stderr


# Ctrl-C in the middle of the stage: the Trainer's checkpoint of STOP_STEP is written, then SIGINT; the stage saves
# at the next step boundary and stops (exit 3); the same command resumes and trains what the uninterrupted run did.
STOP_AT_CHECKPOINT = """
import os, signal, sys
from transformers import Trainer
from jp_peft.cli import main

stop_step = int(os.environ["JP_PEFT_TEST_STOP_STEP"])
save = Trainer._save_checkpoint

def then_stop(self, *args, **kwargs):
    save(self, *args, **kwargs)
    if self.state.global_step == stop_step:
        print(f"test hook: checkpoint of step {stop_step} written, sending SIGINT", flush=True)
        os.kill(os.getpid(), signal.SIGINT)

Trainer._save_checkpoint = then_stop
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_then_the_same_command_resumes_to_the_uninterrupted_result(dpo_run, tmp_path):
    from safetensors.torch import load_file

    out, _, _, _, pairs = dpo_run
    spec = _spec(out.parent / "smoke", "dpo_resume", tmp_path, pairs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "JP_PEFT_TEST_STOP_STEP": "4"}
    stopped = subprocess.run([sys.executable, "-c", STOP_AT_CHECKPOINT, "stage", "dpo", "--spec", str(spec)],
                             capture_output=True, text=True, timeout=900, env=env)
    assert stopped.returncode == 3, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "dpo: stopped at step 5 of 8" in stopped.stderr and "run the same command again to resume" in stopped.stderr
    resumed_dir = out.parent / "dpo_resume"
    assert not (resumed_dir / "dpo" / "metrics.json").exists()
    _cli("stage", "dpo", "--spec", str(spec))
    resumed = json.loads((resumed_dir / "dpo" / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-5")

    def losses(run: Path) -> list[tuple[int, float]]:
        rows = [json.loads(line) for line in (run / "dpo" / "train_log.jsonl").read_text().splitlines()]
        return [(r["trainer/global_step"], r["train/loss"]) for r in rows if "train/loss" in r]

    assert losses(resumed_dir) == losses(out)  # every step once, the same losses
    assert resumed["extra"]["reward_accuracy_after"] == json.loads((out / "dpo" / "metrics.json").read_text())[
        "extra"]["reward_accuracy_after"]
    mine, theirs = (load_file(str(run / "dpo" / "hf_adapter" / "adapter_model.safetensors"))
                    for run in (resumed_dir, out))
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert (mine[name] - theirs[name]).abs().max() <= 1e-6, name


def test_compare_shows_the_reward_accuracy_of_the_dpo_run(dpo_run, tmp_path):
    out = dpo_run[0]
    _cli("compare", str(out), str(out.parent / "smoke"), "--output", str(tmp_path))
    table = (tmp_path / "compare.md").read_text()
    lines = table.splitlines()
    start = lines.index("## Runs (last stage against base)") + 2  # the runs table, after its heading and a blank
    header, _, dpo_row, smoke_row = lines[start:start + 4]
    assert "reward_acc" in header and " -> " in dpo_row and "n/a" in smoke_row.split("|")[-2]


@pytest.mark.slow  # QLoRA under DPO: the sft model loaded in 4-bit, a second dpo run of the fixture's size
def test_dpo_on_a_4bit_base_raises_reward_accuracy_and_exports_a_full_precision_merge(dpo_run, tmp_path):
    out, _, _, _, pairs = dpo_run
    spec = _spec(out.parent / "smoke", "dpo_nf4", tmp_path, pairs, "model.quantization=nf4")
    _cli("stage", "dpo", "--spec", str(spec))
    _cli("stage", "export", "--target", "dpo", "--spec", str(spec))
    run = out.parent / "dpo_nf4" / "dpo"
    metrics = json.loads((run / "metrics.json").read_text())
    extra = metrics["extra"]
    assert extra["quantization"] == {"type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    print(f"DPO on nf4: reward accuracy {extra['reward_accuracy_before']} -> {extra['reward_accuracy_after']}, "
          f"margin {extra['reward_margin_before']} -> {extra['reward_margin_after']}")
    assert extra["reward_accuracy_before"] == 0.0 and extra["reward_accuracy_after"] > 0.0
    checks = {c["check"]: c for c in json.loads((run / "export.json").read_text())["checks"]}
    assert set(checks) == {"hf_merged_vs_trained_nf4", "peft_adapter_vs_hf_merged"}, checks
    assert all(c["ok"] for c in checks.values()), checks
    print("DPO nf4 parity:", {name: c["max_abs_diff"] for name, c in checks.items()})
    merged = json.loads((run / "hf_merged" / "config.json").read_text())
    assert "quantization_config" not in merged
