"""Bench: a run's steps in order, each in its own worker process, with the results file rewritten
after every step (a run stopped early still leaves what it measured).

Per sequence length: every configuration at the first micro batch, the rest of the sweep while the time
budget allows (keeping time for the parity run), then, after the first sequence length, the parity run
(Megatron at its best micro batch for --parity-steps, or the first Megatron trial where that is long
enough), its export stage and the CPU fp32 checks.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path

from bench.gpu import REPO, BenchError, environment, plan, results
from bench.gpu.processes import run_worker, worker_env


def trial_overrides(args, base: Path | None, name: str, backend: str, seq: int, micro: int, steps: int) -> list[str]:
    """The spec of one trial: the production preset (or the smoke preset with --tiny), one CPT stage."""
    global_batch = max(args.global_batch, micro)
    overrides = [f"output_dir={args.work_dir / 'runs'}", f"name={name}", "group=bench", f"backend={backend}",
                 "stages=[import,data,cpt,export]", "wandb.enabled=false", f"cpt.data.seq_length={seq}",
                 f"cpt.train.micro_batch_size={micro}", f"cpt.train.global_batch_size={global_batch}",
                 f"cpt.train.max_steps={steps}", f"cpt.train.warmup_steps={min(args.warmup, steps - 1)}",
                 f"cpt.train.val_check_interval={steps}", "cpt.train.limit_val_batches=1",
                 f"cpt.train.ckpt_every_n_steps={steps}", f"lora.rank={args.rank}"]
    if args.tiny:
        overrides += ["cluster.accelerator=cpu"]
    else:
        overrides += [f"model.name={base}", "model.tiny=false"]
    return overrides


def trial_spec(args, base, name, backend, seq, micro, steps):
    from jp_peft.spec import load_preset, resolve_spec

    return resolve_spec(load_preset("smoke" if args.tiny else "qwen25_500m_ja"),
                        trial_overrides(args, base, name, backend, seq, micro, steps), cwd=REPO)


def trial_name(config: str, seq: int, micro: int) -> str:
    return f"{config.replace('_', '-')}-s{seq}-mb{micro}"


class Bench:
    """Runs the steps in order, each worker in its own process; rewrites the results file after every step."""

    def __init__(self, args, argv: list[str]):
        self.args = args
        self.started = time.perf_counter()
        mode = "tiny-cpu" if args.tiny else "gpu"
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.path = args.results / f"gpu_lora_throughput_{mode}_{stamp}.json"
        self.result = {
            "benchmark": "gpu_lora_throughput", "mode": mode, "complete": False, "failed_step": None, "error": None,
            "command": shlex.join(["python", "bench/gpu_lora_throughput.py", *argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "written": None, "wall_seconds": 0.0,
            "machine": environment.machine(), "versions": environment.versions(), "model": {}, "workload": {},
            "configurations": {c: {"trials": [], "best": {}} for c in args.configs},
            "ratios": {}, "targets": None, "parity": None, "steps": [],
        }
        self.peak: float | None = None  # dense bf16 TFLOP/s of the GPU, from the base worker (none on CPU)
        self.env = worker_env(args.work_dir)
        self.base: Path | None = None
        self.flops: dict[int, float] = {}
        self.last_wall: dict[str, float] = {}  # seconds of each configuration's last trial

    # progress and results ------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, message: str) -> None:
        seconds = int(self.elapsed())
        print(f"[bench {seconds // 60}:{seconds % 60:02d}] {message}", flush=True)

    def write(self) -> None:
        self.result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.result["wall_seconds"] = self.elapsed()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def step_done(self, name: str, started: float, **extra) -> None:
        self.result["steps"].append({"step": name, "seconds": time.perf_counter() - started, **extra})
        self.write()

    # workers --------------------------------------------------------------------------------
    def worker(self, step: str, job: dict, torchrun: bool = False, hide_cuda: bool = False,
               oom_ok: bool = False) -> dict | None:
        """Run one job in its own process (processes.run_worker); None for an out-of-memory when `oom_ok`."""
        return run_worker(step, job, jobs=self.args.work_dir / "jobs", env=self.env, timeout=self.args.worker_timeout,
                          say=self.say, torchrun=torchrun, hide_cuda=hide_cuda, oom_ok=oom_ok)

    # steps ----------------------------------------------------------------------------------
    def check_environment(self) -> None:
        environment.require(self.args.configs, gpu=not self.args.tiny)

    def prepare_base(self) -> None:
        if self.args.tiny:
            from transformers import AutoConfig

            from jp_peft.models.shapes import parameter_count
            from jp_peft.tiny import ensure_tiny_base

            self.base = ensure_tiny_base(log=self.say)
            config = AutoConfig.from_pretrained(self.base)
            self.result["model"] = {"source": "embedded tiny Qwen2 (jp_peft.tiny)", "dir": str(self.base),
                                    "dtype": "float32", "parameters": parameter_count(config),
                                    "hf_config": config.to_diff_dict(), "tokenizer": "jp_peft.tiny byte-level BPE"}
            return
        self.base = self.args.work_dir / ("hf_model_fp32" if self.args.hf_model else "qwen2.5-0.5b-random")
        info = self.worker("base", {"kind": "base", "out": str(self.base),
                                    "source": str(self.args.hf_model) if self.args.hf_model else None})
        for key in ("wall_seconds", "compat"):
            info.pop(key, None)
        self.peak = info.pop("peak_tflops")
        self.result["model"] = {**info, "dir": str(self.base)}

    def shared_stages(self) -> None:
        """import (HF -> NeMo checkpoint, with its HF-vs-NeMo logits check) and data, shared by every trial."""
        backend = "megatron" if "megatron" in self.args.configs else "hf"
        seq, micro = self.args.seq[0], self.args.micro_batches[0]
        spec = trial_spec(self.args, self.base, "shared", backend, seq, micro, 2)
        for stage in ("import", "data"):
            started = time.perf_counter()
            self.say(f"stage {stage} ({backend} backend)")
            self.worker(stage, {"kind": "stage", "spec": spec.to_dict(), "stage": stage})
            self.step_done(stage, started)
        from jp_peft.records import layout as rundir

        record = json.loads(rundir.import_record(spec).read_text())
        self.result["model"]["import_checks"] = record.get("parity", [])

    def describe_workload(self) -> None:
        from transformers import AutoConfig

        from jp_peft.training.flops import lora_flops_per_token, shape_of_hf_config

        spec = trial_spec(self.args, self.base, "describe", "hf", self.args.seq[0], self.args.micro_batches[0], 2)
        shape = shape_of_hf_config(AutoConfig.from_pretrained(self.base))
        self.flops = {s: lora_flops_per_token(shape, s, spec.lora.rank, spec.lora.target_modules) for s in self.args.seq}
        self.result["workload"] = {
            "lora": {"rank": spec.lora.rank, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                     "targets": list(spec.lora.target_modules)},
            "precision": spec.cpt.train.precision, "data": "bundled Japanese/English CPT blend (data/blends/ja90_en10.yaml)",
            "seq_lengths": self.args.seq, "micro_batches": self.args.micro_batches,
            "global_batch": self.args.global_batch, "steps": self.args.steps, "warmup": self.args.warmup,
            "parity_steps": self.args.parity_steps, "time_budget_s": self.args.time_budget,
            "flops_per_token": {str(s): f for s, f in self.flops.items()}, "peak_tflops": self.peak,
            "flops_accounting": "jp_peft.training.flops.lora_flops_per_token (frozen 4N, LoRA 6N, attention)",
            "tokens_per_s": "median of the steps after warm-up; tokens = global batch x seq length per optimizer step",
            "memory": "torch.cuda.max_memory_allocated" if not self.args.tiny else "process max RSS (CPU)",
        }
        self.write()

    def trial(self, config: str, seq: int, micro: int, steps: int, parity_run: bool = False,
              name: str | None = None) -> dict:
        name = name or trial_name(config, seq, micro)
        step = f"{config} seq {seq} micro {micro}" + (" (parity run)" if parity_run else "")
        backend = {"megatron": "megatron", "hf_backend": "hf", "plain_hf_peft": "hf"}[config]
        spec = trial_spec(self.args, self.base, name, backend, seq, micro, steps)
        from jp_peft.records import layout as rundir

        log = rundir.train_log(spec, "cpt")
        if spec.run_dir.exists():
            shutil.rmtree(spec.run_dir)
        self.say(f"{step}: {steps} steps, global batch {spec.cpt.train.global_batch_size}")
        started = time.perf_counter()
        if config == "plain_hf_peft":
            job = {"kind": "plain", "spec": spec.to_dict(), "base": str(self.base), "log": str(log)}
        else:
            job = {"kind": "stage", "spec": spec.to_dict(), "stage": "cpt"}
        done = self.worker(step, job, torchrun=(config == "megatron"), oom_ok=not parity_run)
        record = {"config": config, "seq_length": seq, "micro_batch": micro,
                  "global_batch": spec.cpt.train.global_batch_size, "wall_seconds": time.perf_counter() - started,
                  "log": str(log), "parity_run": parity_run}
        if done is None:
            record.update(status="oom")
        else:
            rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]
            record.update(status="ok", **results.throughput(rows, self.args.warmup, self.flops[seq], self.peak),
                          recipe_adjustments=done.get("recipe_adjustments", []) + done.get("compat", []))
            self.say(f"{step}: {record['tokens_per_s']:,.0f} tokens/s, step {record['step_time_s']['median']:.3f} s"
                     + (f", MFU {record['mfu']:.1%}" if record["mfu"] is not None else "")
                     + (f", peak {record['peak_memory_mb'] / 1024:.1f} GiB" if record["peak_memory_mb"] else ""))
        if config == "hf_backend":  # a 2 GB merged copy per trial is not needed for throughput
            shutil.rmtree(rundir.hf_merged(spec, "cpt"), ignore_errors=True)
        self.add_trial(record)
        self.step_done(step, started, status=record["status"])
        return record

    def add_trial(self, record: dict) -> None:
        entry = self.result["configurations"][record["config"]]
        entry["trials"].append(record)
        ok = [t for t in entry["trials"] if t["status"] == "ok" and t["seq_length"] == record["seq_length"]]
        if ok:
            entry["best"][str(record["seq_length"])] = max(ok, key=lambda t: t["tokens_per_s"])
        self.update_ratios()

    def skipped(self, config: str, seq: int, micro: int, reason: str) -> None:
        self.say(f"{config} seq {seq} micro {micro}: skipped ({reason})")
        self.result["configurations"][config]["trials"].append(
            {"config": config, "seq_length": seq, "micro_batch": micro, "status": "skipped", "reason": reason})
        self.write()

    def update_ratios(self) -> None:
        configurations = self.result["configurations"]
        self.result["ratios"] = results.ratios(configurations, self.args.seq)
        if not self.args.tiny:
            self.result["targets"] = results.targets(configurations, self.result["ratios"])

    def parity(self, parity_spec) -> None:
        from jp_peft.records import layout as rundir

        started = time.perf_counter()
        self.say("stage export (the parity run's hf-peft adapter, merged model, .nemo, export checks)")
        self.worker("export", {"kind": "stage", "spec": parity_spec.to_dict(), "stage": "export", "target": "cpt"})
        export = json.loads(rundir.export_record(parity_spec, "cpt").read_text())
        self.step_done("export", started)
        started = time.perf_counter()
        self.say(f"parity on CPU, fp32: NeMo vs HF+PEFT on {self.args.prompts} Japanese prompts; import -> export hf")
        checked = self.worker("parity", {"kind": "parity", "spec": parity_spec.to_dict(),
                                         "out": str(self.args.work_dir / "parity"), "prompts": self.args.prompts,
                                         "prompt_tokens": self.args.prompt_tokens}, hide_cuda=True)
        for key in ("wall_seconds", "compat"):
            checked.pop(key, None)
        self.result["parity"] = {"run": parity_spec.name, "steps": parity_spec.cpt.train.max_steps,
                                 "export_checks": export.get("checks", []),
                                 "import_checks": self.result["model"].get("import_checks", []), **checked}
        agreement, trip = checked["nemo_vs_peft"], checked["round_trip"]
        self.say(f"parity: max |logit diff| {agreement['max_abs_diff']:.2e}, mean KL {agreement['mean_kl']:.2e}, "
                 f"top-1 {agreement['top1_agreement']:.4f}; round trip max |weight diff| {trip['max_abs_diff']}")
        self.step_done("parity", started)

    def fits_budget(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.args.time_budget

    def parity_reserve(self) -> float:
        """Seconds to keep for what the parity still needs: its own Megatron run, unless the first trial
        is long enough (that trial's start-up, taken from its last wall time, and the extra steps), then
        the export and the CPU checks (plan.PARITY_CHECKS_S, an estimate until a GPU run measures them)."""
        if self.args.parity_steps <= self.args.steps:
            return plan.PARITY_CHECKS_S
        wall = self.last_wall.get("megatron", 0.0)
        trials = [t for t in self.result["configurations"].get("megatron", {}).get("trials", []) if t["status"] == "ok"]
        step = trials[-1]["step_time_s"]["median"] if trials else 0.0
        return wall + step * (self.args.parity_steps - self.args.steps) + plan.PARITY_CHECKS_S

    def run(self) -> None:
        """Setup; then per sequence length: every configuration at the first micro batch, the rest of the
        sweep while the time budget allows (keeping time for the parity run), and after the first sequence
        length the parity run (Megatron at its best micro batch for --parity-steps), its export and checks."""
        args = self.args
        for name, action in (("environment", self.check_environment), ("base model", self.prepare_base),
                             ("workload", self.describe_workload), ("shared stages", self.shared_stages)):
            started = time.perf_counter()
            self.say(f"step {name}")
            action()
            if name != "shared stages":
                self.step_done(name, started)
        parity_due = "megatron" in args.configs
        for seq in args.seq:
            reuse = parity_due and args.parity_steps <= args.steps  # the first Megatron trial is long enough
            for config in args.configs:
                record = self.trial(config, seq, args.micro_batches[0], args.steps,
                                    parity_run=reuse and config == "megatron")
                self.last_wall[config] = record["wall_seconds"]
            self.sweep(seq, parity_pending=parity_due)
            if parity_due:
                self.parity_run(seq, reuse)
                parity_due = False
        self.result["complete"] = True
        self.write()

    def sweep(self, seq: int, parity_pending: bool) -> None:
        """The other micro batches, smallest first per configuration; one that does not fit ends that
        configuration's sweep, and no trial starts that would end past the time budget."""
        oom_at: dict[str, int] = {}
        for micro in self.args.micro_batches[1:]:
            for config in self.args.configs:
                reserve = self.parity_reserve() if parity_pending else 0.0
                if config in oom_at and micro >= oom_at[config]:
                    self.skipped(config, seq, micro, f"micro batch {oom_at[config]} did not fit")
                elif not self.fits_budget(self.last_wall.get(config, 0.0) * 1.2 + reserve):
                    self.skipped(config, seq, micro, f"time budget {self.args.time_budget:.0f} s")
                else:
                    record = self.trial(config, seq, micro, self.args.steps)
                    self.last_wall[config] = record["wall_seconds"]
                    if record["status"] == "oom":
                        oom_at[config] = micro

    def parity_run(self, seq: int, reuse: bool) -> None:
        args = self.args
        if reuse:
            micro, steps, name = args.micro_batches[0], args.steps, trial_name("megatron", seq, args.micro_batches[0])
        else:
            best = self.result["configurations"]["megatron"]["best"].get(str(seq))
            if best is None:
                raise BenchError("parity run: no Megatron trial fitted on this GPU")
            micro, steps = best["micro_batch"], args.parity_steps
            name = trial_name("megatron", seq, micro) + "-parity"
            self.trial("megatron", seq, micro, steps, parity_run=True, name=name)
        self.parity(trial_spec(args, self.base, name, "megatron", seq, micro, steps))
