"""The README's "First run on a GPU" commands, exactly as printed, with the embedded tiny base's directory in place
of /models/Qwen2.5-0.5B: the dry run on the production preset, and the real run with a few steps of CPT and its
export (the eval stage needs the production tasks' Hub data, which this machine cannot fetch: the dry run shows
its plan-time check instead)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
FEW_STEPS = ["cpt.train.max_steps=2", "cpt.train.val_check_interval=2", "cpt.train.limit_val_batches=1",
             "cpt.train.warmup_steps=0", "cpt.train.global_batch_size=2", "cpt.train.micro_batch_size=2",
             "cpt.data.seq_length=128"]


def readme_first_run_commands() -> list[list[str]]:
    """The `python experiments/qwen_lora_ja.py ...` lines of the README's "First run on a GPU" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## First run on a GPU", 1)[1].split("\n## ", 1)[0]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S) for line in block.splitlines()
             if line.startswith("python experiments/qwen_lora_ja.py")]
    assert len(lines) == 2 and lines[0].endswith(" --dryrun") and lines[1] == lines[0].removesuffix(" --dryrun"), lines
    return [shlex.split(line) for line in lines]


def _run(argv: list[str], model: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [str(model) if a == "/models/Qwen2.5-0.5B" else a.replace("/data/lm-eval", str(data_dir)) for a in argv]
    assert argv[0] == "python"
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, *argv[1:], *extra], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=900)


def test_the_readmes_first_run_dry_run_plans_the_production_run_on_a_local_model_directory(tiny_base, tmp_path):
    dry, _ = readme_first_run_commands()
    data_dir = tmp_path / "lm-eval"
    data_dir.mkdir()  # fetched nothing yet: the dry run says what the launch would refuse
    runs = tmp_path / "runs"
    planned = _run(dry, tiny_base, data_dir, "--output-dir", str(runs))
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    assert "experiment qwen_lora_ja: 7 tasks on the local executor (hf backend)" in planned.stdout
    assert f"eval.data_dir={data_dir} lacks the files of ja_leaderboard_jcommonsenseqa" in planned.stderr
    assert not (runs / "qwen_lora_ja" / "cpt").exists()  # a dry run writes no stage output


@pytest.mark.slow  # ~50 s: the production preset's import, data, 2 CPT steps and the export
def test_the_readmes_first_run_command_runs_as_printed_with_a_few_steps(tiny_base, tmp_path):
    _, real = readme_first_run_commands()
    runs = tmp_path / "runs"
    ran = _run(real, tiny_base, tmp_path / "lm-eval", "--output-dir", str(runs), "--stages", "import,data,cpt,export",
               *FEW_STEPS)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    run_dir = runs / "qwen_lora_ja"
    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["model"]["name"] == str(tiny_base) and spec["backend"] == "hf"
    metrics = json.loads((run_dir / "cpt" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["base_model"] == str(tiny_base)
    record = json.loads((run_dir / "cpt" / "export.json").read_text())
    assert record["checks"] and all(c["ok"] for c in record["checks"])
