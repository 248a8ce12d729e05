"""End-to-end wall time of the README's main job (`--smoke`), from an empty model cache.

    python bench/smoke_wall_time.py [--threads N]    # writes bench/results/smoke_wall_time_*.json

--threads sets OMP_NUM_THREADS for the run (torch's intra-op threads in every stage process); the default
is torch's own (one per core). The load average before and after is recorded: on a shared machine the
wall time is only indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the run (default: torch's own)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_smoke_"))
    env = {**os.environ, "JP_PEFT_CACHE": str(work / "cache"), "WANDB_MODE": "offline"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    command = [sys.executable, "experiments/qwen_lora_ja.py", "--executor", "local", "--smoke",
               "--output-dir", str(work / "runs")]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return 1
    cpt = json.loads((work / "runs" / "smoke" / "cpt" / "metrics.json").read_text())
    result = {"benchmark": "smoke_wall_time", "command": "python experiments/qwen_lora_ja.py --executor local --smoke",
              "wall_seconds": wall, "cpt_ja_ppl_before": cpt["base_val_ppl_ja"], "cpt_ja_ppl_after": cpt["val_ppl_ja"],
              "machine": {"cpus": os.cpu_count(), "omp_num_threads": env.get("OMP_NUM_THREADS"),
                          "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = REPO / "bench" / "results" / f"smoke_wall_time_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"smoke: {wall:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
