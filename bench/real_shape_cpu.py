"""The real-shape CPU tier: Qwen2.5-0.5B's exact architecture (random weights, the real tokenizer) through the
whole pipeline, import -> data -> cpt -> export -> sft -> export -> eval, on each backend, one after the other.

    python bench/real_shape_cpu.py                       # both backends -> bench/results/real_shape_cpu_*.json
    python bench/real_shape_cpu.py --backends hf --max-steps 2

The base is jp_peft.models.real_shape's directory (built once, cached). Each backend runs the smoke preset
pointed at it (`model.name=DIR model.tiny=false`; on the Megatron backend `--smoke` puts NeMo on CPU,
which backends/megatron/__init__.py cpu_allowed permits for a local model directory) with short sequences
and a few steps (RUN_OVERRIDES). Recorded per stage:

- peak RSS: the stage's process tree, polled with psutil every POLL_S seconds (the sum over the tree's
  processes at each poll, and the largest single process), attributed to the stage whose `started` line
  the launcher printed last; the launcher's own process (NeMo-Run, ~0.3 GB) is outside the tree counted;
- seconds per step: train_log.jsonl's perf/step_time_s, every step, and their median over steps 2.. (step 1
  warms up); and metrics.json's training wall time;
- bytes on disk: checkpoints/, hf_adapter/, hf_merged/, model.nemo, the imported NeMo checkpoint;
- parity: every check of each export.json (max |logit diff|, tolerance), and the import's;
- what hf_merged holds: its tensors and parameters (from the safetensors headers, nothing loaded), whether
  lm_head.weight is stored apart from embed_tokens and equal to it, config.json's tie_word_embeddings;
  and whether PEFT reloads hf_adapter onto the base and reproduces hf_merged's logits (fp32, the same ids).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
POLL_S = 0.5
BACKENDS = ("hf", "megatron")
TRAINED = ("cpt", "sft")
# Short sequences, batch 2, a validation every 2 steps: enough to pass every stage's code at the real
# shape on 2 CPU cores in minutes; the eval stage scores 4 items of one Japanese and one English task.
RUN_OVERRIDES = [
    *(f"{stage}.{key}" for stage in TRAINED for key in (
        "data.seq_length=64", "train.micro_batch_size=1", "train.global_batch_size=2", "train.val_check_interval=2",
        "train.limit_val_batches=2", "train.warmup_steps=1")),
    "eval.limit=4", "eval.tasks_ja=[jpeft_jcqa]", "eval.tasks_en=[jpeft_en_mc]", "eval.generation=false",
    "eval.batch_size=4",
]


def du(path: Path) -> int | None:
    """Bytes on disk of a file or a directory tree (None where it is not there)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class TreeSampler:
    """Peak RSS of a process tree per stage: a thread polls the launcher's descendants."""

    def __init__(self, root_pid: int):
        import psutil

        self.root = psutil.Process(root_pid)
        self.stage = None
        self.peaks: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        while not self._stop.wait(POLL_S):
            stage = self.stage
            if stage is None:
                continue
            total, largest = 0, 0
            try:
                children = self.root.children(recursive=True)
            except psutil.Error:
                continue
            for proc in children:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                largest = max(largest, rss)
            peak = self.peaks.setdefault(stage, {"tree_rss_bytes": 0, "largest_process_rss_bytes": 0})
            peak["tree_rss_bytes"] = max(peak["tree_rss_bytes"], total)
            peak["largest_process_rss_bytes"] = max(peak["largest_process_rss_bytes"], largest)


def run_backend(backend: str, base: Path, work: Path, max_steps: int, env: dict) -> dict:
    name = f"shape-{backend}"
    overrides = [*RUN_OVERRIDES, *(f"{s}.train.max_steps={max_steps}" for s in TRAINED),
                 *(f"{s}.train.ckpt_every_n_steps={max_steps}" for s in TRAINED)]
    command = [sys.executable, "experiments/qwen_lora_ja.py", "--executor", "local", "--smoke", "--backend", backend,
               f"model.name={base}", "model.tiny=false", "--output-dir", str(work / "runs"), "--name", name,
               "--no-wandb", *overrides]
    log_path = work / f"{name}.log"
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    stage_started: dict[str, float] = {}
    with open(log_path, "w", buffering=1) as log:  # line-buffered: the log shows where a long run is
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        prefix = f"[jp-peft] {name}-"
        for line in proc.stdout:
            log.write(line)
            if line.startswith(prefix) and (": started" in line or ": done" in line):
                task = line[len(prefix):].split(":", 1)[0]  # import, data, cpt, export-cpt, ...
                if ": started" in line:
                    sampler.stage, stage_started[task] = task, time.perf_counter()
                else:
                    stage_seconds[task] = round(time.perf_counter() - stage_started.get(task, started), 1)
        status = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - started
    if status != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{backend}: the run exited {status}; log {log_path}:\n{tail}")
    run_dir = work / "runs" / name
    result = {"command": " ".join(["python", *command[1:]]).replace(str(work), "$WORK"), "wall_seconds": round(wall, 1),
              "stage_seconds": stage_seconds, "peak_rss": sampler.peaks, "stages": {}}
    for stage in TRAINED:
        result["stages"][stage] = trained_stage(run_dir / stage, backend)
    result["import"] = import_record(run_dir, backend, env)
    return result


def step_times(train_log: Path) -> dict:
    rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    steps = {}
    for row in rows:
        if "perf/step_time_s" in row:
            steps[row["trainer/global_step"]] = row["perf/step_time_s"]
    later = [t for step, t in sorted(steps.items()) if step > 1]
    return {"per_step_s": {str(k): round(v, 3) for k, v in sorted(steps.items())},
            "median_s_per_step_after_first": round(statistics.median(later), 3) if later else None,
            "losses": [round(r["train/loss"], 4) for r in rows if "train/loss" in r]}


def trained_stage(stage_dir: Path, backend: str) -> dict:
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    export = json.loads((stage_dir / "export.json").read_text())
    checkpoints = stage_dir / ("nemo/checkpoints" if backend == "megatron" else "checkpoints")
    out = {"steps": step_times(stage_dir / "train_log.jsonl"),
           "metrics": {k: metrics.get(k) for k in ("steps", "wall_seconds", "tokens_per_second", "trainable_params",
                                                     "total_params", "base_val_loss_ja", "val_loss_ja", "val_loss_en")
                       if k in metrics},
           "bytes": {"checkpoints": du(checkpoints), "hf_adapter": du(stage_dir / "hf_adapter"),
                     "hf_merged": du(stage_dir / "hf_merged"), "model.nemo": du(stage_dir / "model.nemo")},
           "parity": [{k: c.get(k) for k in ("check", "max_abs_diff", "atol", "argmax_agreement", "positions",
                                              "ok", "tolerance_reason") if k in c}
                      for c in export.get("checks", [])],
           "hf_merged": merged_facts(stage_dir / "hf_merged")}
    return out


def merged_facts(merged: Path) -> dict:
    """What hf_merged stores, read from its safetensors headers and config.json (no model is built)."""
    from safetensors import safe_open

    config = json.loads((merged / "config.json").read_text())
    shapes: dict[str, list[int]] = {}
    files = sorted(merged.glob("*.safetensors"))
    for file in files:
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
    numel = {k: int(__import__("math").prod(v)) for k, v in shapes.items()}
    embed = next((k for k in shapes if k.endswith("embed_tokens.weight")), None)
    head = next((k for k in shapes if k.endswith("lm_head.weight")), None)
    equal = None
    if embed and head:
        import torch

        tensors = {}
        for file in files:
            with safe_open(file, "pt") as handle:
                for key in (embed, head):
                    if key in handle.keys():
                        tensors[key] = handle.get_tensor(key)
        equal = bool(torch.equal(tensors[embed], tensors[head]))
    return {"files": [f.name for f in files], "tensors": len(shapes), "stored_parameters": sum(numel.values()),
            "tie_word_embeddings": config.get("tie_word_embeddings"), "lm_head_stored": head is not None,
            "lm_head_parameters": numel.get(head) if head else 0, "lm_head_equals_embed_tokens": equal,
            "dtype": config.get("torch_dtype", config.get("dtype"))}


PEFT_RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base_dir, adapter, merged_dir = sys.argv[1:4]
ids = torch.randint(0, 151000, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    want = merged(input_ids=ids).logits
    merged_params = sum(p.numel() for p in merged.parameters())
    merged_tied = merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    del merged
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, adapter)
    got = peft(input_ids=ids).logits
    inner = peft.get_base_model()
    print(json.dumps({"max_abs_diff": (got - want).abs().max().item(),
                      "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
                      "positions": int(ids.numel()), "merged_loaded_parameters": merged_params,
                      "merged_loaded_tied": merged_tied,
                      "peft_base_tied": inner.lm_head.weight.data_ptr() == inner.model.embed_tokens.weight.data_ptr(),
                      "peft_modules_to_save": sorted(json.load(open(adapter + "/adapter_config.json")).get("modules_to_save") or [])}))
"""


def peft_reload(stage_dir: Path, start: Path, env: dict) -> dict:
    """PEFT's reload of the stage's hf_adapter onto the model it started from, against hf_merged's logits
    (in a fresh process, so this bench holds no 2 GB model between stages)."""
    proc = subprocess.run([sys.executable, "-c", PEFT_RELOAD, str(start), str(stage_dir / "hf_adapter"),
                           str(stage_dir / "hf_merged")], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def import_record(run_dir: Path, backend: str, env: dict) -> dict:
    base_json = run_dir / "import" / "base.json"
    info = json.loads(base_json.read_text()) if base_json.exists() else {}
    out = {"parity": info.get("parity", [])}
    if info.get("nemo_checkpoint"):
        out["bytes_nemo_checkpoint"] = du(Path(info["nemo_checkpoint"]))
    return out


def bench_env(work: Path) -> dict:
    """The runs' environment: NeMo's import goes under NEMO_HOME (default ~/.cache/nemo) and datasets
    caches under HF_HOME, both kept in `work`; this checkout's src first."""
    return {**os.environ, "NEMO_HOME": str(work / "nemo_home"), "HF_HOME": str(work / "hf_home"),
            "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",  # the launcher's stage lines as they happen
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def measure_backend(backend: str, base: Path, work: Path, max_steps: int, env: dict) -> dict:
    """One backend's whole run and its records, plus PEFT's reload of each stage's adapter (the tests of
    tests/integration/test_real_shape_pipeline.py read the same record)."""
    record = run_backend(backend, base, work, max_steps, env)
    run_dir = work / "runs" / f"shape-{backend}"
    for stage in TRAINED:
        # the model the adapter applies to, as export.json says (sft's: cpt's merged model)
        start = json.loads((run_dir / stage / "export.json").read_text()).get("adapter_base") or base
        record["stages"][stage]["adapter_base"] = str(start).replace(str(work), "$WORK")
        record["stages"][stage]["peft_reload"] = peft_reload(run_dir / stage, Path(start), env)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, run in this order")
    parser.add_argument("--max-steps", type=int, default=4, help="steps of cpt and of sft (default 4)")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a new directory under /tmp)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend not in BACKENDS:
            print(f"error: --backends: {backend!r} is not one of {', '.join(BACKENDS)}", file=sys.stderr)
            return 2
    if args.max_steps < 2:
        print("error: --max-steps: at least 2 (a validation every 2 steps)", file=sys.stderr)
        return 2
    from jp_peft.models.real_shape import ensure_real_shape_base
    from jp_peft.models.shapes import QWEN25_05B_PARAMETERS

    base = ensure_real_shape_base(log=lambda m: print(m, file=sys.stderr))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_real_shape_", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    env = bench_env(work)
    result = {"benchmark": "real_shape_cpu", "base": {"dir_name": base.name, "params": QWEN25_05B_PARAMETERS,
                                                       "bytes": du(base), **json.loads((base / "jp_peft_base.json").read_text())},
              "overrides": RUN_OVERRIDES, "max_steps": args.max_steps, "rss_method": f"psutil, the stage's process tree "
              f"polled every {POLL_S} s (sum over the tree, and the largest process)",
              "machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()}, "backends": {}}
    out = RESULTS / f"real_shape_cpu_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for backend in backends:
        print(f"[bench] {backend}: running in {work}", file=sys.stderr, flush=True)
        try:
            result["backends"][backend] = measure_backend(backend, base, work, args.max_steps, env)
        except Exception as err:  # the other backend still runs; the file says which failed and how
            import traceback

            failed.append(backend)
            result.setdefault("failed", {})[backend] = (str(err) + "\n" + traceback.format_exc())[-4000:]
            print(f"[bench] {backend}: failed: {err}", file=sys.stderr, flush=True)
        else:
            print(f"[bench] {backend}: done in {result['backends'][backend]['wall_seconds']:.0f} s", file=sys.stderr,
                  flush=True)
        result["machine"]["load_average_after"] = os.getloadavg()
        result["written"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        out.write_text(json.dumps(result, indent=2) + "\n")  # after each backend: a later failure keeps this one
    print(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
