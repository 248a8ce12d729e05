"""LoRA training throughput on one GPU, side by side in one run, and NeMo-vs-Hugging Face parity.

Three configurations train Qwen2.5-0.5B's exact architecture (random weights from its config, or a
real checkpoint with --hf-model) with LoRA rank 32 on all seven linear projections, bf16, on blocks of
the bundled Japanese corpus, each at every micro batch of a sweep until one does not fit:
  megatron       jp-peft's Megatron backend: the composed recipe (recipes/qwen25_500m_ja.py cpt_lora)
                 run by jp-peft's stage runner (jp_peft.stages.run_stage), under torchrun
  hf_backend     jp-peft's hf backend (backends/hf_stages.py train: transformers + peft + Lightning)
  plain_hf_peft  a plain transformers + peft loop: bf16 weights, sdpa attention, AdamW
Then the parity run (the first Megatron trial, or Megatron at its best micro batch when --parity-steps
is longer than --steps) goes through the run's own export stage, and a CPU fp32 check loads its adapter
with HF+PEFT and compares logits with NeMo's on 32 Japanese prompts, and exports the imported base back
to HF ("hf") to compare the weights.

On a GPU (one H100/H200; the defaults plan 9 minutes with the carried-wheel install; later sweep points
are skipped, and say so, when --time-budget would be exceeded):
    python bench/gpu_lora_throughput.py                        # seq 2048, micro batches 4 8 16
    python bench/gpu_lora_throughput.py --seq 2048 4096 --time-budget 900
    python bench/gpu_lora_throughput.py --hf-model /models/Qwen2.5-0.5B
    python bench/report.py                                     # renders BENCHMARKS.md's GPU table
On CPU, every configuration for a few steps on the embedded tiny Qwen2 (NeMo's CPU path; the results
are marked tiny-cpu and never rendered into the GPU table; tests/bench runs this):
    python bench/gpu_lora_throughput.py --tiny
The steps with their time budgets, and the one device command line, without running anything:
    python bench/gpu_lora_throughput.py --dryrun

The device image has torch, transformers 5, peft and lightning but none of NeMo, megatron-core or
nemo_run: `bench/gpu/carry.sh .whl` downloads what a device run carries (bench/gpu/carry.txt), and the
device command --dryrun prints installs it first. The environment step stops at once, naming what is
missing, where the stack (pyproject.toml: nemo_toolkit 2.7.3, megatron-core 0.15, nemo_run, transformers
4.57) is not importable by the interpreter that runs this.

Writes bench/results/gpu_lora_throughput_<mode>_<time>.json (--results), rewritten after every
step so that a run stopped early still leaves what it measured; bench/gpu/results.py RESULT_FIELDS
lists its fields. Every trial runs in its own process (its own peak memory; an out-of-memory ends only
that trial). The code is the package bench/gpu/ (its __init__ lists the modules).
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # runs from a checkout without `pip install -e .`
    REPO = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(REPO / "src"), str(REPO)]
    from bench.gpu.cli import main

    sys.exit(main(description=__doc__))
