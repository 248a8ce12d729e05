"""The Megatron CPU tier's shared run: `--smoke --backend megatron`, every stage, through the real CLI and
NeMo-Run's local executor (conftest.megatron_run makes it once per session)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEGATRON_OVERRIDES = ["cpt.train.max_steps=16", "cpt.train.val_check_interval=8", "cpt.train.limit_val_batches=4",
                      "cpt.train.ckpt_every_n_steps=8", "sft.train.max_steps=10", "sft.train.val_check_interval=5",
                      "sft.train.limit_val_batches=4", "sft.train.ckpt_every_n_steps=5",
                      "eval.limit=12"]  # as conftest.SMOKE_EVAL_LIMIT: the preset scores every item (minutes per model)


def megatron_experiment(*args, env=None, timeout=1200):
    return subprocess.run([sys.executable, str(REPO / "experiments/qwen_lora_ja.py"), "--executor", "local", "--smoke",
                           "--backend", "megatron", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


EXPORT_ADAPTERS = """
import sys
from jp_peft.backends.megatron import cpu as megatron_cpu
megatron_cpu.enable()
import jp_peft.backends.megatron.nemo_exporters
from nemo.collections import llm
from jp_peft.backends.megatron.stages import last_checkpoint
for ckpt_dir, out in zip(sys.argv[1::2], sys.argv[2::2]):
    llm.export_ckpt(path=last_checkpoint(ckpt_dir), target="hf-peft", output_path=out)
"""


def export_adapters(stage_dirs: dict, out: Path, env: dict) -> dict:
    """NeMo's hf-peft exporter on each stage's last checkpoint, in one process (a checkpoint written by several
    ranks is loaded resharded to one): {name: the adapter's tensors}."""
    from safetensors.torch import load_file

    args = [str(arg) for name, stage_dir in stage_dirs.items() for arg in (stage_dir / "nemo" / "checkpoints", out / name)]
    proc = subprocess.run([sys.executable, "-c", EXPORT_ADAPTERS, *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: load_file(out / name / "adapter_model.safetensors") for name in stage_dirs}


def run_in_own_group(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Output to files, not pipes, in a session of its own: a SIGKILLed Megatron stage leaves the processes
    it spawned (multiprocessing's resource tracker and a spawn child) alive, holding any pipe open; they are
    killed here, with the whole session, and reported."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=REPO, env=env, start_new_session=True)
        try:
            status = proc.wait(timeout=900)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 0)
                print(f"left behind by {command[-3:]}: processes of session {proc.pid}, killed")
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, status, out.read(), err.read())


def rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]


def train_losses(stage_dir: Path) -> dict[int, float]:
    found = [(r["trainer/global_step"], r["train/loss"]) for r in rows(stage_dir) if "train/loss" in r]
    assert [s for s, _ in found] == sorted({s for s, _ in found}), f"a step was logged twice: {found}"
    return dict(found)


def val_losses(stage_dir: Path) -> list[tuple]:
    return [(r["trainer/global_step"], r["val/ja_loss"], r["val/en_loss"]) for r in rows(stage_dir) if "val/ja_loss" in r]
