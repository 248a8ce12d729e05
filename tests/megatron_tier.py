"""The Megatron CPU tier's shared run: `--smoke --backend megatron`, every stage, through the real CLI and
NeMo-Run's local executor (conftest.megatron_run makes it once per session)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEGATRON_OVERRIDES = ["cpt.train.max_steps=16", "cpt.train.val_check_interval=8", "cpt.train.limit_val_batches=4",
                      "cpt.train.ckpt_every_n_steps=8", "sft.train.max_steps=10", "sft.train.val_check_interval=5",
                      "sft.train.limit_val_batches=4", "sft.train.ckpt_every_n_steps=5",
                      "eval.limit=40"]  # the preset scores every item (minutes per model); 40 as before


def megatron_experiment(*args, env=None, timeout=1200):
    return subprocess.run([sys.executable, str(REPO / "experiments/qwen_lora_ja.py"), "--executor", "local", "--smoke",
                           "--backend", "megatron", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)
