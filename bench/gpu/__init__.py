"""The GPU LoRA throughput benchmark behind bench/gpu_lora_throughput.py (its entry script and CLI).

  cli.py          arguments, --dryrun, main (the entry script calls it)
  plan.py         the steps a run takes, their time budgets, and the one device command line
  trials.py       Bench: the steps in order, the micro batch sweep, the parity run
  processes.py    one worker process per step (own peak memory; an out-of-memory ends only it)
  workers.py      what runs inside a worker: a jp-peft stage, the base model, the plain loop, parity
  environment.py  the machine, the versions, what each configuration imports
  results.py      the results file's fields, throughput statistics, ratios and targets
  carry.py        the wheels a device run carries (carry.txt) and their checks (carry.sh runs it)
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Every worker process is started through the entry script, so `--worker JOB` is part of its CLI.
ENTRY = REPO / "bench" / "gpu_lora_throughput.py"
CONFIGS = ("megatron", "hf_backend", "plain_hf_peft")


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message names it."""
