"""Runs are safe to interrupt, re-run, run twice and share (the launcher's side of it).

The same spec resumes and keeps what finished; another spec is refused before anything starts; two
launches never share a run; a failed stage stops what depends on it and shows its log; Ctrl-C and
SIGTERM stop the running stage within seconds after it saved, start nothing else, leave no process
behind, and say how to resume; routine mistakes are one line and exit 2.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = [sys.executable, str(REPO / "experiments/qwen_lora_ja.py"), "--executor", "local", "--smoke"]
SHORT = ["--stages", "import,data,cpt", "cpt.train.max_steps=4", "cpt.train.warmup_steps=1", "cpt.train.val_check_interval=2",
         "cpt.train.limit_val_batches=2", "cpt.train.ckpt_every_n_steps=2", "--no-wandb"]


def _run(*args, timeout=900, **kwargs):
    return subprocess.run([*EXPERIMENT, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs)


def _files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("safety")
    proc = _run("--output-dir", str(out), *SHORT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.integration
def test_the_same_spec_resumes_and_keeps_finished_stages(short_run):
    metrics = short_run / "smoke" / "cpt" / "metrics.json"
    before = metrics.read_bytes()
    proc = _run("--output-dir", str(short_run), *SHORT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert metrics.read_bytes() == before  # not retrained, not rewritten
    assert "3/3 tasks finished" in proc.stdout


@pytest.mark.integration
@pytest.mark.parametrize("change, field", [(["cpt.train.lr=0.05"], "cpt.train.lr: 0.01 -> 0.05"),
                                           (["lora.rank=8"], "lora.rank: 32 -> 8"),
                                           (["--hf-model", "{tiny_base}"], "model.name")])  # a real model dir
@pytest.mark.parametrize("dryrun", [False, True], ids=["launch", "dryrun"])
def test_a_different_spec_is_refused_before_anything_starts(short_run, tiny_base, change, field, dryrun):
    change = [c.replace("{tiny_base}", str(tiny_base)) for c in change]  # a model directory the plan accepts
    before = _files(short_run)
    proc = _run("--output-dir", str(short_run), *SHORT, *change, *(["--dryrun"] if dryrun else []), timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "was made with another spec" in proc.stderr and field in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(short_run) == before  # nothing written, nothing touched


@pytest.mark.integration
def test_overwrite_starts_the_run_over_with_the_new_spec(tmp_path, tiny_base):
    assert _run("--output-dir", str(tmp_path), *SHORT).returncode == 0
    old = json.loads((tmp_path / "smoke" / "cpt" / "metrics.json").read_text())
    proc = _run("--output-dir", str(tmp_path), *SHORT, "cpt.train.lr=0.05", "--overwrite")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new = json.loads((tmp_path / "smoke" / "cpt" / "metrics.json").read_text())
    assert json.loads((tmp_path / "smoke" / "spec.json").read_text())["cpt"]["train"]["lr"] == 0.05
    assert new["spec_fingerprint"] != old["spec_fingerprint"] and new["train_loss_last"] != old["train_loss_last"]


@pytest.mark.integration
def test_a_second_launch_into_a_busy_run_exits_at_once_naming_the_holder(tmp_path, tiny_base):
    first = subprocess.Popen([*EXPERIMENT, "--output-dir", str(tmp_path), *SHORT], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "smoke" / ".jp-peft.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.2)
    second = _run("--output-dir", str(tmp_path), *SHORT, timeout=120)
    # "at once": it did not wait for the holder, which is still training when the second launch has exited
    assert first.poll() is None, "the first launch ended before the second was refused: nothing was shown"
    assert second.returncode == 2
    assert "in use by another launch" in second.stderr and f'"pid": {first.pid}' in second.stderr
    assert first.wait(timeout=900) == 0
    assert json.loads((tmp_path / "smoke" / "cpt" / "metrics.json").read_text())["steps"] == 4


@pytest.mark.integration
def test_a_failed_stage_stops_its_dependants_and_shows_its_log(tmp_path):
    broken = tmp_path / "broken-model"  # passes the plan's file check, fails when the import stage loads it
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (broken / name).write_text("{ not json" if name == "config.json" else "")
    proc = _run("--output-dir", str(tmp_path / "runs"), "--stages", "import,data,cpt", "--hf-model", str(broken),
                "--no-wandb", timeout=300)
    assert proc.returncode == 1
    assert "FAILED: smoke-import" in proc.stderr and "  | " in proc.stderr  # the failing task's last log lines
    assert "NOT STARTED: smoke-data: smoke-import did not finish" in proc.stderr
    assert "NOT STARTED: smoke-cpt: smoke-data did not finish" in proc.stderr
    launched = {p.name for p in (tmp_path / "runs" / "smoke" / "launches" / "experiments").iterdir()}
    assert launched == {"smoke-import"}  # the dependants never started a process
    assert "0/3 tasks finished" in proc.stdout


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_the_running_stage_saves_and_says_how_to_resume(tmp_path, tiny_base, sig):
    args = ["--output-dir", str(tmp_path), "--stages", "import,data,cpt,export", "cpt.train.max_steps=60",
            "cpt.train.val_check_interval=30", "cpt.train.ckpt_every_n_steps=50", "--no-wandb"]
    launcher = subprocess.Popen([*EXPERIMENT, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    log = tmp_path / "smoke" / "cpt" / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and launcher.poll() is None:
        if log.exists() and sum('"train/loss"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    logged_before = sum('"train/loss"' in line for line in log.read_text().splitlines())
    launcher.send_signal(sig)
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 130, output[-3000:]
    # stopped at the end of the step it was in, not after its 60 steps nor at the planned checkpoint at 50
    # (no wall-clock bound: "soon" is the saved step, the last one logged, and nothing trained after it)
    import torch

    saved = torch.load(tmp_path / "smoke" / "cpt" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    logged = [json.loads(line)["trainer/global_step"] for line in log.read_text().splitlines() if '"train/loss"' in line]
    assert logged[-1] == saved and logged_before <= saved < 50, (logged_before, saved, logged)
    assert "interrupted" in output and "Resume with the same command" in output
    assert (tmp_path / "smoke" / "cpt" / "checkpoints" / "last.ckpt").exists()  # saved at the end of its step
    assert not (tmp_path / "smoke" / "cpt" / "metrics.json").exists()  # not reported as done
    assert not (tmp_path / "smoke" / "launches" / "experiments" / "smoke-export-cpt").exists()  # nothing else began
    time.sleep(1)
    assert _processes_mentioning(str(tmp_path)) == []  # no stage process left behind
    if sig != signal.SIGINT:
        return  # resuming does not depend on which signal stopped the run: checked once, after Ctrl-C
    status = subprocess.run([sys.executable, "-m", "jp_peft.cli", "status", str(tmp_path / "smoke")],
                            capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^  smoke-cpt +unfinished\n    \[jp-peft\] cpt step \d+/60 loss", status.stdout, re.M), status.stdout
    assert re.search(r"^  smoke-export-cpt +not started$", status.stdout, re.M), status.stdout
    assert "no launch holds it" in status.stdout

    resumed = subprocess.run([*EXPERIMENT, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "smoke" / "cpt" / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["resumed_from"]


@pytest.mark.integration
@pytest.mark.parametrize("args, message", [
    (["--stages", ""], "--stages: empty"),
    (["--name", ".."], "name: expected a name"),
    (["name=1e5"], "name: expected a name"),
    (["lora.rank=true"], "lora.rank: expected int, got True"),
    (["lora.alpha=abc"], "lora.alpha: expected int, got 'abc'"),
    (["cpt.data.blend=my_blend.yaml"], "cpt.data.blend: blend file my_blend.yaml does not exist"),
    (["--sweep", "lora.rank=8,8"], "--sweep 'lora.rank=8,8': 8 given twice"),
    (["cpt.train.lr=-1"], "cpt.train.lr: must be positive"),
])
def test_routine_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    proc = _run("--output-dir", str(tmp_path), "--dryrun", *args, timeout=120)
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-1000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.integration
@pytest.mark.parametrize("content", ["- a\n- b\n", "just a string\n", "42\n"], ids=["list", "scalar", "number"])
def test_a_preset_that_is_not_a_mapping_names_the_file(tmp_path, content):
    preset = tmp_path / "preset.yaml"
    preset.write_text(content)
    proc = _run("--preset", str(preset), "--dryrun", timeout=120)
    assert proc.returncode == 2 and f"{preset}: a preset is a mapping" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_output_dir_on_a_file_is_refused_before_anything_starts(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    proc = _run("--output-dir", str(target), "--no-wandb", "--stages", "import", timeout=120)
    assert proc.returncode == 2 and "is a file, not a directory" in proc.stderr and "Traceback" not in proc.stderr
    assert target.read_text() == "x"


@pytest.mark.integration
def test_compare_names_a_missing_or_corrupt_run(tmp_path):
    cli = [sys.executable, "-m", "jp_peft.cli", "compare"]
    proc = subprocess.run([*cli, str(tmp_path / "missing"), "--output", str(tmp_path / "out")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no such run directory" in proc.stderr and "Traceback" not in proc.stderr
    run = tmp_path / "run"
    (run / "cpt").mkdir(parents=True)
    (run / "spec.json").write_text("{}")
    (run / "cpt" / "metrics.json").write_text("{not json")
    proc = subprocess.run([*cli, str(run), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "metrics.json is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
def test_changing_an_eval_field_reruns_only_the_eval_stage(short_run):
    """Eval fields are not part of what the trained stages computed: a new task limit is accepted (not
    refused as another spec), keeps cpt as it is and scores again."""
    metrics = short_run / "smoke" / "cpt" / "metrics.json"
    results = short_run / "smoke" / "eval" / "results.json"
    before = metrics.read_bytes()
    common = ["--stages", "import,data,cpt,eval", *SHORT[2:], "eval.tasks_ja=[jpeft_jcqa]", "eval.tasks_en=[jpeft_en_mc]",
              "eval.generation=false"]
    for limit in (4, 6):
        proc = _run("--output-dir", str(short_run), *common, f"eval.limit={limit}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "4/4 tasks finished" in proc.stdout and metrics.read_bytes() == before
        scored = json.loads(results.read_text())["models"]
        assert list(scored) == ["base", "cpt"]
        assert {t["n"] for m in scored.values() for t in m["tasks"].values()} == {limit}
