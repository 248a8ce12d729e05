"""The command lines answer fast, explain themselves, and refuse what cannot run here clearly."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
# What "answers at once" means, checked as behaviour (a wall-clock bound fails on a loaded CI machine):
# the command finishes without importing any heavy library.
HEAVY = ("torch", "transformers", "lightning", "nemo", "nemo_run", "megatron", "peft", "datatrove", "lm_eval")
LIGHT_RUN = """
import runpy, sys
try:
    script, sys.argv = sys.argv[1], sys.argv[1:]
    if script.endswith(".py"):
        runpy.run_path(script, run_name="__main__")
    else:
        from jp_peft.cli import main
        sys.exit(main(sys.argv[1:]))
finally:
    print("heavy imports:", sorted(m for m in %r if m in sys.modules), file=sys.stderr)
""" % (HEAVY,)


def _light(*args):
    """Run the CLI (jp-peft ARGS) or a script (path.py ARGS) and report which heavy libraries it imported."""
    proc = subprocess.run([sys.executable, "-c", LIGHT_RUN, *args], capture_output=True, text=True, cwd=REPO)
    imported = re.search(r"^heavy imports: (.*)$", proc.stderr, re.M)
    assert imported, proc.stderr[-2000:]
    return proc, imported.group(1)


def _timed(cmd):
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    return proc, time.perf_counter() - started


def test_the_installed_jp_peft_command_answers_help():
    proc, _ = _timed([shutil.which("jp-peft") or str(Path(sys.executable).with_name("jp-peft")), "--help"])
    assert proc.returncode == 0 and "usage:" in proc.stdout


@pytest.mark.parametrize("program", ["jp-peft", "experiments/qwen_lora_ja.py"])
def test_help_answers_without_importing_anything_heavy(program):
    proc, heavy = _light(program, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert heavy == "[]", f"{program} --help imported {heavy}"


def test_megatron_backend_without_cuda_exits_2_with_what_to_do():
    if shutil.which("nvidia-smi") and Path("/dev/nvidiactl").exists():
        pytest.skip("this machine has a GPU: the Megatron backend would run")
    proc, heavy = _light("experiments/qwen_lora_ja.py", "--executor", "local")
    assert proc.returncode == 2
    for hint in ("--smoke", "--backend hf", "--dryrun"):
        assert hint in proc.stderr
    assert "Traceback" not in proc.stderr and heavy == "[]"  # refused before importing anything heavy


@pytest.mark.parametrize("args, message", [
    (["--smoke", "lora.rank=0"], "lora.rank: must be a positive integer"),
    (["--smoke", "lora.target_modules=[q_proj,qkv]"], "lora.target_modules: unknown module 'qkv'"),
    (["--smoke", "cpt.train.global_batch_size=10"], "cpt.train.global_batch_size: 10 is not divisible"),
    (["--smoke", "cpt.train.max_step=3"], "did you mean 'max_steps'"),
    (["--smoke", "--stages", "cpt", "--output-dir", "/nonexistent-jp-peft"], "cpt.data.blend[ja]: not prepared yet"),
    (["--dryrun", "lora.target_modules=[q_proj,v_proj]"], "lora.target_modules: ['q_proj', 'v_proj'] splits"),
])
def test_invalid_specs_fail_before_launch_naming_the_field(args, message):
    proc, _ = _timed([sys.executable, "experiments/qwen_lora_ja.py", *args])
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_data_prepare_rejects_bad_arguments_without_traceback(tmp_path):
    proc, _ = _timed([sys.executable, "-m", "jp_peft.cli", "data", "prepare", "--input", str(tmp_path / "missing.jsonl"),
                      "--tokenizer", "x", "--output-prefix", str(tmp_path / "o")])
    assert proc.returncode == 2 and "--input" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_export_without_target_exits_2_naming_it(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    proc, _ = _timed([sys.executable, "-m", "jp_peft.cli", "stage", "export", "--spec", str(spec)])
    assert proc.returncode == 2 and "--target" in proc.stderr and "Traceback" not in proc.stderr


def test_stage_command_refuses_a_bad_spec_or_eval_tasks_in_one_line(tmp_path):
    """`jp-peft stage` is also run by hand: a missing or broken spec file, a spec field out of range and an eval
    stage whose tasks cannot run all exit 2 with the file or field named, before any model loads."""
    from jp_peft.spec import resolve_spec
    from jp_peft.spec import load_preset

    stage = [sys.executable, "-m", "jp_peft.cli", "stage"]
    proc, _ = _timed([*stage, "cpt", "--spec", str(tmp_path / "absent.json")])
    assert proc.returncode == 2 and "absent.json" in proc.stderr and "Traceback" not in proc.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",\n  oops}')
    proc, _ = _timed([*stage, "cpt", "--spec", str(broken)])
    assert proc.returncode == 2 and "broken.json:2: not JSON" in proc.stderr and "Traceback" not in proc.stderr
    values = load_preset("smoke")
    spec = resolve_spec(values, [f"output_dir={tmp_path}", "eval.tasks_ja=[jpeft_jcqa,jcqa_typo]"]).to_dict()
    good = tmp_path / "spec.json"
    good.write_text(json.dumps(spec))
    proc, _ = _timed([*stage, "eval", "--spec", str(good)])
    assert proc.returncode == 2 and "eval.tasks_ja: unknown task 'jcqa_typo'" in proc.stderr
    assert "Traceback" not in proc.stderr
    spec["cpt"]["train"]["lr"] = -1
    good.write_text(json.dumps(spec))
    proc, _ = _timed([*stage, "cpt", "--spec", str(good)])
    assert proc.returncode == 2 and "cpt.train.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_dryrun_prints_every_task_of_a_sweep_and_runs_nothing(tmp_path):
    proc, _ = _timed([sys.executable, "experiments/qwen_lora_ja.py", "--smoke", "--dryrun", "--output-dir",
                      str(tmp_path), "--stages", "data,cpt,sft", "--sweep", "lora.rank=8,16"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for task in ("smoke-data", "smoke-rank8-cpt", "smoke-rank8-sft", "smoke-rank16-cpt", "smoke-rank16-sft"):
        assert task in proc.stdout
    assert "smoke-rank16-sft after smoke-rank16-cpt" in proc.stdout
    assert not list(tmp_path.glob("*/rank*/metrics.json")) and not (tmp_path / "smoke-rank8" / "cpt").exists()


def test_eval_tasks_without_data_are_refused_before_anything_starts(tmp_path):
    """An unknown task and a task whose data set is not here: one line each, naming the spec field and how to
    provide the data; exit 2 before any stage starts (nothing written). A dry run shows them as warnings."""
    args = [sys.executable, "experiments/qwen_lora_ja.py", "--smoke", "--output-dir", str(tmp_path), "--no-wandb",
            "eval.tasks_ja=[jpeft_jcqa,jcqa_typo]", "eval.tasks_en=[jpeft_en_mc,hellaswag]"]
    proc, seconds = _timed(args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "eval.tasks_ja: unknown task 'jcqa_typo'" in proc.stderr
    hellaswag = next(line for line in proc.stderr.splitlines() if line.startswith("eval.tasks_en: hellaswag"))
    assert "eval.data_dir=DATA_DIR" in hellaswag and "`jp-peft eval fetch-data DATA_DIR --tasks hellaswag`" in hellaswag
    assert "Traceback" not in proc.stderr and "started" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written: no run directory, no spec.json
    proc, _ = _timed([*args, "--dryrun"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the eval stage would fail: eval.tasks_en: hellaswag" in proc.stderr
