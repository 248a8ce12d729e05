"""W&B offline runs of the smoke experiment, read back from their transaction logs."""

import math
import subprocess
from pathlib import Path

import pytest

from wandb_offline import read_offline_run

pytestmark = pytest.mark.integration
STEP_KEYS = ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/samples_per_s",
             "perf/step_time_s", "perf/consumed_tokens", "perf/peak_memory_mb", "perf/tflops_per_s")
VAL_KEYS = ("val/ja_ppl", "val/en_ppl", "val/ja_ppl_gain", "val/en_ppl_forgetting")


def _run_of(run_dir: Path, stage: str) -> dict:
    runs = [read_offline_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]
    found = [r for r in runs if r["run"]["job_type"] == stage]
    assert len(found) == 1, [r["run"] for r in runs]
    return found[0]


@pytest.mark.parametrize("stage, steps", [("cpt", 16), ("sft", 10)])
def test_offline_run_is_comparable(smoke_run, stage, steps):
    run = _run_of(smoke_run[0], stage)
    ident = run["run"]
    assert (ident["group"], ident["job_type"], ident["name"], ident["project"]) == ("smoke", stage, f"{stage}:smoke", "jp-peft")
    assert {"smoke", stage, "hf"} <= set(ident["tags"])
    config = run["config"]
    assert config["spec"]["lora"]["rank"] == 32 and config["spec"]["cpt"]["train"]["max_steps"] == 16  # nested
    assert set(config["git"]) == {"commit", "dirty"}
    assert config["params"]["trainable"] > 0 and 0 < config["params"]["trainable_percent"] < 100
    assert run["metrics"].get("*") == "trainer/global_step"  # every metric plotted against the trainer step

    train_rows = [r for r in run["history"] if "train/loss" in r]
    assert [r["trainer/global_step"] for r in train_rows] == list(range(1, steps + 1))
    for row in train_rows:
        for key in STEP_KEYS:
            assert math.isfinite(row[key]), (key, row)
    assert train_rows[-1]["perf/consumed_samples"] == steps * 8
    val_rows = [r for r in run["history"] if "val/ja_ppl" in r]
    assert [r["trainer/global_step"] for r in val_rows] == [steps // 2, steps]
    assert all(math.isfinite(r[k]) for r in val_rows for k in VAL_KEYS)

    artifacts = [a for a in run["artifacts"] if a["type"] == "lora-adapter"]
    assert artifacts and artifacts[0]["metadata"]["steps"] == steps and "val_ppl_ja" in artifacts[0]["metadata"]


def test_api_key_never_lands_in_anything_the_run_wrote(smoke_run, fake_wandb_key):
    run_dir = smoke_run[0]
    hits = subprocess.run(["grep", "-rl", "--binary-files=text", fake_wandb_key, str(run_dir.parent)],
                          capture_output=True, text=True)
    assert hits.stdout == "", f"API key found in: {hits.stdout}"
    assert fake_wandb_key not in smoke_run[1]


def test_eval_run_has_a_table_per_model_and_the_averages(smoke_run):
    run_dir = smoke_run[0]
    run = _run_of(run_dir, "eval")
    ident = run["run"]
    assert (ident["group"], ident["name"]) == ("smoke", "eval:smoke") and {"smoke", "eval"} <= set(ident["tags"])
    logged = {key: value for row in run["history"] for key, value in row.items()}
    for key in ("eval/base", "eval/cpt", "eval/sft", "eval/samples"):  # tables: one row per task (4 JA + 2 EN), or per prompt
        assert logged[f"{key}/_type"] == "table-file" and logged[f"{key}/nrows"] == (20 if key == "eval/samples" else 6)
    import json

    summary = json.loads((run_dir / "summary.json").read_text())["downstream"]["models"]
    for model in ("base", "cpt", "sft"):
        for key in ("ja_avg", "en_avg"):
            assert run["summary"][f"eval/{model}/{key}"] == pytest.approx(summary[model][key])
    assert run["summary"]["eval/cpt/en_forgetting"] == pytest.approx(summary["cpt"]["en_forgetting"])
    assert "eval/base/ja_gain" not in run["summary"]  # base has no gain against itself
