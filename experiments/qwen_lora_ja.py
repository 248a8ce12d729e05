"""Qwen2.5-0.5B Japanese LoRA continual learning: import -> data -> CPT -> SFT -> export -> eval.

Local, embedded tiny model on CPU (minutes; the README's main job):
    python experiments/qwen_lora_ja.py --executor local --smoke
The same on NeMo's real Megatron path (NeMo 2.7.3 on CPU: import, LoRA CPT/SFT, merge, exports):
    python experiments/qwen_lora_ja.py --executor local --smoke --backend megatron
Local GPU workstation, real Qwen2.5-0.5B on NeMo Megatron:
    python experiments/qwen_lora_ja.py --executor local cluster.gpus_per_node=8
Slurm (profiles in slurm/*.yaml), a rank sweep, W&B online if WANDB_API_KEY is exported:
    python experiments/qwen_lora_ja.py --executor slurm --slurm-profile h100_pyxis --sweep lora.rank=8,16,32
Show everything that would run, without running it:
    python experiments/qwen_lora_ja.py --executor slurm --slurm-profile h100_pyxis --dryrun
Overrides are dotted `key=value` (spec fields, e.g. cpt.train.max_steps=2000 lora.rank=16;
`train.X`/`data.X` set both stages). The same entry point is `jp-peft run` (jp_peft/cli/run.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src")]  # runs from a checkout even before `pip install -e .`

from jp_peft.cli.run import main  # noqa: E402  (light: no torch, no NeMo)

if __name__ == "__main__":
    sys.exit(main(prog="qwen_lora_ja.py"))
