"""`jp-peft eval` through a real subprocess: offline results, and refusals before any model loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _env():
    return {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}


def _eval(*args, timeout=300):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=_env(), timeout=timeout)
    return proc, time.perf_counter() - started


def test_eval_writes_results_json_offline(tiny_base, tmp_path):
    import lm_eval

    proc, _ = _eval("--model", tiny_base, "--tasks", "jpeft_jcqa", "--limit", "10", "--output", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from jp_peft.evaluation.harness import read_results

    record = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert read_results(tmp_path / "results.json") == record
    assert record["format"] == 1 and record["lm_eval_version"] == lm_eval.__version__ == "0.4.13"
    assert record["model"] == str(Path(tiny_base).resolve()) and record["adapter"] is None
    assert (record["device"], record["dtype"], record["limit"], record["seed"]) == ("cpu", "float32", 10, 1234)
    task = record["tasks"]["jpeft_jcqa"]
    assert (task["source"], task["n"], task["n_total"], task["num_fewshot"], task["version"]) == \
        ("bundled", 10, 125, 0, 1.0)
    assert set(task["metrics"]) == {"acc", "acc_norm"}
    acc = task["metrics"]["acc"]
    assert acc["value"] * 10 == pytest.approx(round(acc["value"] * 10))  # a share of 10 items
    assert acc["stderr"] == pytest.approx((acc["value"] * (1 - acc["value"]) / 9) ** 0.5)
    assert re.fullmatch(r"[0-9a-f]{64}", task["config_sha256"])
    assert set(task["data_sha256"]) == {"test", "train"}
    # the printed table carries the same numbers, and lm-eval's logging stays out of the output
    assert re.search(rf"^jpeft_jcqa\s+acc\s+{acc['value']:.4f}\s+{acc['stderr']:.4f}\s+10\s+0$", proc.stdout, re.M)
    assert f"wrote {tmp_path / 'results.json'}" in proc.stdout
    assert not re.search(r"\b(INFO|WARNING)\b", proc.stdout + proc.stderr), proc.stderr[-3000:]


def test_missing_dataset_is_reported_before_any_model_loads(tiny_base):
    """Exit 2 with one line naming the task and how to give it data; torch, transformers and lm-eval's
    model code are never even imported."""
    code = ("import sys; from jp_peft.cli import main; rc = main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval.models.huggingface', 'lm_eval.evaluator') "
            "if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--model", str(tiny_base), "--tasks",
                           "jpeft_jcqa,ja_leaderboard_jcommonsenseqa"], capture_output=True, text=True, cwd=REPO,
                          env=_env(), timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ja_leaderboard_jcommonsenseqa: needs Hub data set Rakuten/JGLUE (JCommonsenseQA)")
    assert "--data-dir DATA_DIR holding ja_leaderboard_jcommonsenseqa/validation.jsonl" in line
    assert proc.stdout.strip() == "[]"  # no model library was imported: that is what "at once" means here


@pytest.mark.parametrize("args, named", [
    (["--model", "/nonexistent/model", "--tasks", "jpeft_jcqa"], "--model /nonexistent/model"),
    (["--model", "TINY", "--tasks", "jpeft_jcqa,no_such_task"], "'no_such_task'"),
    (["--model", "TINY", "--adapter", "/nonexistent/adapter", "--tasks", "jpeft_jcqa"],
     "--adapter /nonexistent/adapter"),
])
def test_bad_input_exits_2_with_one_line_naming_it(tiny_base, args, named):
    proc, _ = _eval(*[str(tiny_base) if a == "TINY" else a for a in args], timeout=60)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and named in line and proc.stdout == ""


def test_help_explains_with_a_bundled_example():
    code = ("import sys\nfrom jp_peft.cli import main\ntry:\n    sys.exit(main(sys.argv[1:]))\nfinally:\n    "
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--help"], capture_output=True, text=True, cwd=REPO,
                          env=_env(), timeout=120)
    assert proc.returncode == 0
    for text in ("jp-peft eval --model", "--tasks jpeft_jcqa", "DATA_DIR/<task>/<split>.jsonl", "ja_leaderboard_gen",
                 "--adapter", "--include-path", "--num-fewshot", "--limit", "--batch-size", "--output"):
        assert text in proc.stdout
    assert "heavy: []" in proc.stderr, proc.stderr[-1000:]  # help at once: no model library imported
