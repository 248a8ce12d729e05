"""bench/gpu_lora_throughput.py (the package bench/gpu/): what can be checked without a GPU.

unit: the Qwen2.5-0.5B architecture it builds (jp_peft.models.shapes), the statistics/FLOP/MFU helpers on
known inputs, logit and weight comparisons, the sweep (order, out-of-memory, time budget, best micro
batch) with trials faked at the process boundary, the device run's plan (every step budgeted, 540 s in
all) and its command line, and report.py's GPU table (tiny/CPU results are never rendered).
megatron_cpu, slow: `--tiny` end to end on CPU: every configuration, the parity run's export, the parity
numbers and every documented field of the results file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is not installed: the checkout's root makes `bench.gpu` importable
    sys.path.insert(0, str(REPO))

from bench.gpu import CONFIGS, BenchError, cli, environment, model, plan, processes, results, trials, workers  # noqa: E402
from jp_peft.export.parity import logit_agreement  # noqa: E402
from jp_peft.models import shapes  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load("bench_report", REPO / "bench" / "report.py")


# --- the model it benchmarks -------------------------------------------------------------------

@pytest.mark.unit
def test_qwen25_05b_config_is_the_exact_architecture():
    config = model.qwen25_05b_config()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (24, 896, 14, 2, 4864, 151936)
    assert config.tie_word_embeddings is True
    assert config.rope_theta == 1_000_000.0 and config.rms_norm_eps == 1e-6 and config.hidden_act == "silu"
    assert config.hidden_size // config.num_attention_heads == 64


@pytest.mark.unit
def test_parameter_count_is_qwen25_05b_with_tied_embeddings():
    # By hand: embedding 151936*896; per layer q (896*896 + bias 896), k and v (896*128 + bias 128),
    # o 896*896, gate/up/down 3*896*4864, two RMSNorms 2*896; the final norm 896; lm_head tied.
    layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    by_formula = 151936 * 896 + 24 * layer + 896
    assert by_formula == 494_032_768 == shapes.QWEN25_05B_PARAMETERS
    config = model.qwen25_05b_config()
    assert shapes.parameter_count(config) == 494_032_768  # transformers' own model, on the meta device
    assert shapes.parameter_count(shapes.QWEN25_05B_HF_CONFIG) == 494_032_768  # a config.json dict works too
    config.tie_word_embeddings = False
    assert shapes.parameter_count(config) == 494_032_768 + 151936 * 896


@pytest.mark.unit
def test_the_flop_accounting_uses_the_same_shape():
    from jp_peft.training.flops import QWEN25_05B, shape_of_hf_config, shape_of_hf_dict

    assert shape_of_hf_config(model.qwen25_05b_config()) == QWEN25_05B
    assert shape_of_hf_dict(shapes.QWEN25_05B_HF_CONFIG) == QWEN25_05B


# --- statistics, FLOPs, MFU ----------------------------------------------------------------------

@pytest.mark.unit
def test_percentile_interpolates_like_numpy():
    import numpy as np

    assert results.percentile([5, 1, 3, 2, 4], 50) == 3
    assert results.percentile([1, 2, 3, 4], 50) == 2.5
    assert results.percentile(range(11), 10) == 1.0
    assert results.percentile([10.0, 20.0], 90) == pytest.approx(19.0)
    values = [0.31, 0.29, 0.35, 0.30, 0.52, 0.28, 0.33]
    for q in (0, 10, 25, 50, 90, 100):
        assert results.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError):
        results.percentile([], 50)


@pytest.mark.unit
def test_step_time_spread():
    spread = results.step_time_spread([1.0, 1.0, 1.0, 1.0, 2.0])
    assert spread["median"] == 1.0 and spread["min"] == 1.0 and spread["max"] == 2.0
    assert spread["p10"] == 1.0 and spread["p90"] == pytest.approx(1.6)
    assert spread["relative_spread"] == pytest.approx(0.6)


def _rows(tokens_per_s, step_time=None, memory=None):
    rows = []
    for i, tps in enumerate(tokens_per_s):
        rows.append({"trainer/global_step": i + 1, "train/loss": 5.0, "perf/tokens_per_s": tps,
                     "perf/step_time_s": step_time[i] if step_time else 32768 / tps,
                     "perf/peak_memory_mb": memory[i] if memory else 1000.0 + i})
    return rows


@pytest.mark.unit
def test_throughput_is_the_median_after_warmup_with_tflops_and_mfu():
    rows = _rows([100.0, 200.0, 1000.0, 900.0, 1100.0], step_time=[9.0, 8.0, 1.0, 1.2, 0.9],
                 memory=[10.0, 20.0, 30.0, 25.0, 5.0])
    rows.insert(3, {"trainer/global_step": 3, "val/ja_loss": 6.0})  # a validation row has no perf keys
    result = results.throughput(rows, warmup=2, flops_per_token=2e9, peak=989.0)
    assert result["steps"] == 5 and result["measured_steps"] == 3
    assert result["tokens_per_s"] == 1000.0
    assert result["tflops_per_s"] == pytest.approx(2.0)  # 1000 tok/s x 2e9 FLOP/token
    assert result["mfu"] == pytest.approx(2.0 / 989.0)
    assert result["peak_memory_mb"] == 30.0  # the whole run's peak, warm-up included
    assert result["step_time_s"]["median"] == 1.0 and result["step_time_s"]["max"] == 1.2
    assert results.throughput(rows, 2, 2e9, None)["mfu"] is None  # CPU: no peak, no MFU
    with pytest.raises(BenchError, match="fewer than warm-up"):
        results.throughput(rows, warmup=4, flops_per_token=1.0, peak=None)


@pytest.mark.unit
def test_lora_flops_and_mfu_at_the_target_throughput():
    from jp_peft.training.flops import PEAK_TFLOPS_BF16, QWEN25_05B, lora_flops_per_token
    from jp_peft.spec import HF_LORA_TARGETS

    frozen = 24 * (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864) + 151936 * 896  # projections + LM head
    lora = 24 * 32 * (2 * (896 + 896) + 2 * (896 + 128) + 3 * (896 + 4864))
    attention = 3 * 4 * 24 * 2048 * 14 * 64
    expected = 4 * frozen + 6 * lora + attention
    assert lora_flops_per_token(QWEN25_05B, 2048, 32, HF_LORA_TARGETS) == expected == 2_609_905_664
    rows = _rows([120_000.0] * 4)
    result = results.throughput(rows, 1, expected, PEAK_TFLOPS_BF16["H100"])
    assert result["tflops_per_s"] == pytest.approx(313.19, abs=0.01)
    assert result["mfu"] == pytest.approx(0.3167, abs=1e-4)


@pytest.mark.unit
def test_the_peak_comes_from_the_base_worker(tmp_path, monkeypatch):
    """On a GPU the base worker asks jp_peft.training.flops.peak_tflops (the parent never opens CUDA)."""
    args = cli.parse_args(["--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    b = trials.Bench(args, [])
    monkeypatch.setattr(b, "worker", lambda step, job: {"source": "x", "parameters": 1, "hf_config": {},
                                                       "peak_tflops": 989.0, "compat": [], "wall_seconds": 1.0})
    b.prepare_base()
    assert b.peak == 989.0 and set(b.result["model"]) == {"source", "parameters", "hf_config", "dir"}


@pytest.mark.unit
def test_numpy_2_gets_the_alias_megatron_core_015_calls(monkeypatch):
    import numpy

    if hasattr(numpy, "product"):  # numpy 1.x (pyproject's pin): nothing to do
        assert workers.numpy_compat() == []
        monkeypatch.delattr(numpy, "product")  # as on the device image's numpy 2
    assert "numpy.product = numpy.prod" in workers.numpy_compat()[0]
    assert numpy.product is numpy.prod


@pytest.mark.unit
def test_the_environment_step_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(environment.NEEDED, "plain_hf_peft", {"no_such_module_xyz": "no-such-dist"})
    with pytest.raises(BenchError, match=r"^environment: not installed for .*: no-such-dist \(needed by plain_hf_peft"):
        environment.require(["plain_hf_peft"], gpu=False)


# --- comparisons -------------------------------------------------------------------------------

@pytest.mark.unit
def test_logit_agreement_on_known_distributions():
    import torch

    a = torch.zeros(1, 2, 2)
    b = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    result = logit_agreement(a, b)
    # position 2: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert result["mean_kl"] == pytest.approx(0.5 * 0.5 * math.log(4 / 3))
    assert result["max_kl"] == pytest.approx(0.5 * math.log(4 / 3))
    assert result["max_abs_diff"] == pytest.approx(math.log(3.0))
    assert result["top1_agreement"] == 0.5 and result["positions"] == 2
    same = logit_agreement(b, b.clone())
    assert same["max_abs_diff"] == 0.0 and same["mean_kl"] == 0.0 and same["top1_agreement"] == 1.0


@pytest.mark.unit
def test_compare_weights_per_tensor_and_tied_lm_head(tmp_path):
    import torch
    from safetensors.torch import save_file

    embed, norm = torch.randn(8, 4), torch.ones(4)
    save_file({"model.embed_tokens.weight": embed, "model.norm.weight": norm, "only.base": torch.zeros(1)},
              str(tmp_path / "base.safetensors"))
    (tmp_path / "export").mkdir()
    shifted = norm.clone()
    shifted[2] += 0.25
    save_file({"model.embed_tokens.weight": embed.clone(), "lm_head.weight": embed.clone(), "model.norm.weight": shifted,
               "only.export": torch.zeros(2)}, str(tmp_path / "export" / "model.safetensors"))
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (tmp_path / "base.safetensors").rename(base_dir / "model.safetensors")
    result = workers.compare_weights(base_dir, tmp_path / "export")
    assert result["per_tensor"] == {"lm_head.weight": 0.0, "model.embed_tokens.weight": 0.0, "model.norm.weight": 0.25}
    assert result["max_abs_diff"] == 0.25 and result["tensors_compared"] == 3
    assert result["only_in_base"] == ["only.base"] and result["only_in_export"] == ["only.export"]


@pytest.mark.unit
def test_out_of_memory_is_recognised_and_progress_lines_are_thinned():
    assert results.is_oom("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not results.is_oom("RuntimeError: shape mismatch")
    assert processes.echo("[jp-peft] cpt step 10/200 loss 5.1 100 tok/s ETA 0:01:00\n")
    assert not processes.echo("[jp-peft] cpt step 11/200 loss 5.1 100 tok/s ETA 0:01:00\n")
    assert processes.echo("[jp-peft] cpt step 200/200 loss 5.1 100 tok/s ETA 0:00:00\n")
    assert processes.echo("[jp-peft] export cpt: peft_adapter_vs_hf_merged max |logit diff| 3e-06\n")
    assert not processes.echo("[NeMo I 2026-11-30 megatron_init:451] Rank 0 has data parallel group : [0]\n")


# --- the sweep, with trials faked at the process boundary ----------------------------------------

FAKE_TOKENS_PER_S = {"megatron": 1000.0, "hf_backend": 300.0, "plain_hf_peft": 200.0}


def _fake_bench(tmp_path, monkeypatch, argv, oom=(), calls=None):
    """A Bench whose worker processes are replaced: a trial writes train_log rows (tokens/s = the
    configuration's rate x micro batch) or runs out of memory for the (config, micro) pairs in `oom`."""
    from jp_peft.records import layout as rundir
    from jp_peft.spec import experiment_from_dict

    args = cli.parse_args([*argv, "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    b = trials.Bench(args, argv)
    calls = calls if calls is not None else []

    def fake_worker(step, job, torchrun=False, hide_cuda=False, oom_ok=False):
        spec = experiment_from_dict(job["spec"])
        config = {"megatron": "megatron", "hf": "hf_backend"}[spec.backend] if job["kind"] == "stage" else "plain_hf_peft"
        micro, steps = spec.cpt.train.micro_batch_size, spec.cpt.train.max_steps
        calls.append((config, micro, steps, torchrun))
        if (config, micro) in oom:
            assert oom_ok
            return None
        log = Path(job["log"]) if job["kind"] == "plain" else rundir.train_log(spec, "cpt")
        log.parent.mkdir(parents=True, exist_ok=True)
        rate = FAKE_TOKENS_PER_S[config] * micro
        log.write_text("".join(json.dumps(r) + "\n" for r in _rows([rate] * steps, memory=[micro * 1024.0] * steps)))
        return {}

    monkeypatch.setattr(b, "worker", fake_worker)
    for name in ("check_environment", "prepare_base", "shared_stages"):
        monkeypatch.setattr(b, name, lambda: None)
    monkeypatch.setattr(b, "parity", lambda spec: calls.append(("parity", spec.name, spec.cpt.train.max_steps)))
    b.base = tmp_path / "base"
    b.flops = {s: 1e9 for s in args.seq}
    monkeypatch.setattr(b, "describe_workload", lambda: b.result.update(workload={"seq_lengths": args.seq}))
    return b, calls


@pytest.mark.unit
def test_sweep_order_out_of_memory_best_micro_batch_and_parity_run(tmp_path, monkeypatch):
    b, calls = _fake_bench(tmp_path, monkeypatch, ["--tiny", "--micro-batches", "2", "4", "8", "--parity-steps", "8"],
                           oom={("hf_backend", 4)})
    b.run()
    assert calls == [("megatron", 2, 6, True), ("hf_backend", 2, 6, False), ("plain_hf_peft", 2, 6, False),
                     ("megatron", 4, 6, True), ("hf_backend", 4, 6, False), ("plain_hf_peft", 4, 6, False),
                     ("megatron", 8, 6, True), ("plain_hf_peft", 8, 6, False),
                     ("megatron", 8, 8, True), ("parity", "megatron-s128-mb8-parity", 8)]  # at the best micro batch
    result = json.loads(b.path.read_text())
    assert result["complete"] is True and result["mode"] == "tiny-cpu" and result["targets"] is None
    hf = result["configurations"]["hf_backend"]["trials"]
    assert [(t["micro_batch"], t["status"]) for t in hf] == [(2, "ok"), (4, "oom"), (8, "skipped")]
    assert hf[2]["reason"] == "micro batch 4 did not fit"
    best = {c: e["best"]["128"] for c, e in result["configurations"].items()}
    assert {c: t["micro_batch"] for c, t in best.items()} == {"megatron": 8, "hf_backend": 2, "plain_hf_peft": 8}
    assert best["megatron"]["tokens_per_s"] == 8000.0 and best["megatron"]["tflops_per_s"] == pytest.approx(8.0)
    assert best["megatron"]["peak_memory_mb"] == 8 * 1024.0
    assert result["ratios"]["128"] == {"megatron_over_plain": pytest.approx(5.0),
                                       "megatron_over_hf_backend": pytest.approx(8000 / 600),
                                       "hf_backend_over_plain": pytest.approx(600 / 1600)}
    parity_trial = result["configurations"]["megatron"]["trials"][-1]
    assert parity_trial["parity_run"] is True and parity_trial["steps"] == 8 and parity_trial["measured_steps"] == 6
    for trial in (t for e in result["configurations"].values() for t in e["trials"] if t["status"] == "ok"):
        assert set(results.TRIAL_FIELDS) <= set(trial)


@pytest.mark.unit
def test_the_time_budget_skips_sweep_points_but_never_the_first_nor_the_parity_run(tmp_path, monkeypatch):
    b, calls = _fake_bench(tmp_path, monkeypatch, ["--tiny", "--micro-batches", "2", "4", "--time-budget", "0"])
    b.run()
    # --parity-steps (6) <= --steps (6): the first Megatron trial is the parity run
    assert calls == [("megatron", 2, 6, True), ("hf_backend", 2, 6, False), ("plain_hf_peft", 2, 6, False),
                     ("parity", "megatron-s128-mb2", 6)]
    result = json.loads(b.path.read_text())
    skipped = [t for e in result["configurations"].values() for t in e["trials"] if t["status"] == "skipped"]
    assert len(skipped) == 3 and all(t["reason"] == "time budget 0 s" and t["micro_batch"] == 4 for t in skipped)
    assert result["configurations"]["megatron"]["trials"][0]["parity_run"] is True


@pytest.mark.unit
def test_the_budget_keeps_time_for_the_parity_run(tmp_path, monkeypatch):
    """A sweep trial that fits the budget alone, but not with the parity run still to come, is skipped."""
    b, calls = _fake_bench(tmp_path, monkeypatch, ["--tiny", "--micro-batches", "2", "4", "--parity-steps", "106",
                                                    "--time-budget", "1000", "--configs", "megatron"])
    b.run()
    # reserve: the last Megatron trial's wall (~0 s) + its median step (16.384 s) x 100 more steps + PARITY_CHECKS_S
    assert b.parity_reserve() == pytest.approx(16.384 * 100 + plan.PARITY_CHECKS_S, abs=1.0)
    assert calls == [("megatron", 2, 6, True), ("megatron", 2, 106, True), ("parity", "megatron-s128-mb2-parity", 106)]


@pytest.mark.unit
def test_gpu_mode_records_targets_and_a_failed_step(tmp_path, monkeypatch):
    """On a GPU the targets are judged in the results; a failing worker ends the run naming its step,
    and the results file keeps what was measured before."""
    b, calls = _fake_bench(tmp_path, monkeypatch, ["--micro-batches", "4", "8", "--configs", "megatron",
                                                    "plain_hf_peft", "--time-budget", "1e6"])
    b.peak = 989.0
    real = b.worker

    def failing(step, job, **kwargs):
        if step == "plain_hf_peft seq 2048 micro 8":
            raise BenchError(f"{step}: worker exited 1; log x.log; its last lines:\nboom")
        return real(step, job, **kwargs)

    monkeypatch.setattr(b, "worker", failing)
    monkeypatch.setattr(trials, "Bench", lambda args, argv: b)
    assert cli.main(["--micro-batches", "4", "8", "--configs", "megatron", "plain_hf_peft", "--time-budget", "1e6",
                       "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "results")]) == 1
    result = json.loads(b.path.read_text())
    assert result["complete"] is False and result["failed_step"] == "plain_hf_peft seq 2048 micro 8"
    assert "boom" in result["error"]
    targets = result["targets"]
    assert targets["megatron_tokens_per_s_per_gpu"] == {"target": 120000, "measured": 8000.0, "met": False}
    assert targets["megatron_over_plain"]["measured"] == pytest.approx(8000 / 800)
    assert targets["megatron_over_plain"]["met"] is True
    assert result["configurations"]["megatron"]["best"]["2048"]["mfu"] == pytest.approx(8000 * 1e9 / 1e12 / 989)


def _budgets(out: str) -> dict[str, int | None]:
    """The dry run's numbered steps: text -> seconds (None where skipped)."""
    found = {}
    for line in out.splitlines():
        head, _, seconds = line.rpartition(" ")
        if line[:4].strip().rstrip(".").isdigit() and head:
            found[head.split(". ", 1)[1].strip()] = None if seconds == "-" else int(seconds)
    return found


@pytest.mark.unit
def test_dryrun_budgets_every_step_of_the_device_run_within_nine_minutes(capsys, tmp_path):
    assert cli.main(["--dryrun", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    budgets = _budgets(out)
    steps = list(budgets)
    assert steps[0] == "install the carried wheels (.whl -> /tmp/site)"
    assert steps[1].startswith("environment: ") and steps[2].startswith("model build: Qwen2.5-0.5B config")
    assert steps[3].startswith("shared stage import") and steps[4].startswith("shared stage data")
    for config in CONFIGS:  # each configuration's first trial always runs
        first = next(s for s in steps if s.startswith(f"{config} seq 2048 micro 4: 20 steps"))
        assert budgets[first] > 0
    assert "megatron seq 2048 micro 4: 20 steps (the parity run)" in steps  # --parity-steps defaults to --steps
    assert steps[-2].startswith("export of the parity run") and steps[-1].startswith("parity on CPU, fp32")
    assert all(v is None or v > 0 for v in budgets.values())
    skipped = [s for s, v in budgets.items() if v is None]
    assert skipped and all("(skipped: past the 510 s budget)" in s for s in skipped)
    total = sum(v for v in budgets.values() if v)
    assert total <= plan.DEVICE_LIMIT_S == 540
    assert re.search(rf"total \(estimated\) +{total} of 540\n", out)
    assert re.search(r"hard stop: install \+ --time-budget 510 \+ stop grace +540 of 540\n", out)
    command = out.strip().splitlines()[-1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert command == (
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
        ".whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail; "
        + (f"JP_PEFT_COMMIT={commit} " if commit else "")
        + "PYTHONUNBUFFERED=1 timeout -k 10 510 python3 bench/gpu_lora_throughput.py --time-budget 510 "
        '--results "$OUT" 2>&1 | tee "$OUT/gpu_lora_throughput.log"')
    assert len(command) <= 2000  # the device tool's limit on a command
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.unit
def test_dryrun_keeps_the_runs_arguments_and_refuses_a_run_past_the_device_limit(capsys):
    assert cli.main(["--dryrun", "--configs", "megatron", "--seq", "1024", "--results", "/elsewhere"]) == 0
    command = capsys.readouterr().out.strip().splitlines()[-1]
    assert "bench/gpu_lora_throughput.py --configs megatron --seq 1024 --time-budget 510 --results \"$OUT\"" in command
    assert "/elsewhere" not in command and "--dryrun" not in command
    assert cli.main(["--dryrun", "--seq", "2048", "4096", "8192", "--parity-steps", "200"]) == 1
    assert "OVER the device's 540 s" in capsys.readouterr().out
    assert cli.main(["--dryrun", "--time-budget", "900"]) == 1  # the hard stop alone is past 540 s


@pytest.mark.unit
def test_tiny_dryrun_lists_the_steps_without_a_device_command(capsys):
    assert cli.main(["--dryrun", "--tiny", "--seq", "128", "256"]) == 0
    out = capsys.readouterr().out
    assert "  5. megatron seq 128 micro 2: 6 steps (the parity run)\n" in out
    assert " 11. export of the parity run" in out  # after the first sequence length's sweep
    assert "megatron seq 256 micro 4: 6 steps" in out and "pip install" not in out


@pytest.mark.unit
def test_argument_errors():
    with pytest.raises(SystemExit):
        cli.parse_args(["--tiny", "--hf-model", "/models/x"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--steps", "6", "--warmup", "5"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--micro-batches", "4", "4"])


# --- report.py ---------------------------------------------------------------------------------

@pytest.mark.unit
def test_report_renders_the_gpu_table_from_gpu_results_only(tmp_path, monkeypatch):
    b, _ = _fake_bench(tmp_path, monkeypatch, ["--micro-batches", "4", "8", "--time-budget", "1e6"])
    b.peak = 989.0
    b.result["machine"].update(gpu="NVIDIA H200", driver="580.159.04", gpu_memory="143771 MiB")
    b.run()
    gpu = json.loads(b.path.read_text())
    gpu["workload"] = {"lora": {"rank": 32, "targets": ["q_proj"] * 7}, "precision": "bf16-mixed", "global_batch": 16,
                       "warmup": 5, "steps": 20, "seq_lengths": [2048], "peak_tflops": 989.0}
    gpu["model"] = {"source": "random weights", "parameters": 494_032_768}
    a = {"max_abs_diff": 3e-5, "mean_kl": 1e-9, "top1_agreement": 1.0, "positions": 2048, "nemo_form": "n",
         "peft_form": "p"}
    gpu["parity"] = {"run": "megatron-s2048-mb4", "steps": 200, "prompts": 32, "prompt_tokens": 64, "nemo_vs_peft": a,
                     "import_checks": [], "export_checks": [{"check": "peft_adapter_vs_hf_merged", "max_abs_diff": 0.01,
                                                             "argmax_agreement": 1.0, "atol": 0.05, "positions": 512}],
                     "round_trip": {"max_abs_diff": 0.0, "tensors_compared": 290, "only_in_base": [],
                                    "only_in_export": []}}
    results = tmp_path / "rendered"
    results.mkdir()
    (results / "gpu_lora_throughput_gpu_20260101_000000.json").write_text(json.dumps(gpu))
    tiny = {**gpu, "mode": "tiny-cpu"}
    (results / "gpu_lora_throughput_tiny-cpu_20270101_000000.json").write_text(json.dumps(tiny))
    monkeypatch.setattr(report, "RESULTS", results)
    found = report.latest_gpu()
    assert found[0].name == "gpu_lora_throughput_gpu_20260101_000000.json"
    text = "\n".join(report.gpu_section(found))
    assert "## GPU: NVIDIA H200" in text and "driver 580.159.04" in text and "494,032,768 parameters" in text
    assert "| jp-peft Megatron backend | 8 | 8,000 | 8.0 | 0.8% | 8.0 | 4.096 (4.096-4.096) |" in text
    assert "| plain transformers + peft | 8 | 1,600 | 1.6 | 0.2% | 8.0 |" in text
    assert "Megatron / plain HF+PEFT **5.00x**" in text
    assert "Megatron >= 120,000 tokens/s/GPU: 8,000 on NVIDIA H200, **not met**" in text
    assert "3x plain HF+PEFT: 5.00x, met" in text
    assert "| NeMo vs HF+PEFT adapter (2,048 positions) | 3.00e-05 | 1.00e-09 | 1.0000 | |" in text
    assert "round trip: max |weight diff| 0.00e+00 over 290 tensors" in text
    (results / "gpu_lora_throughput_gpu_20260101_000000.json").unlink()
    assert report.latest_gpu() is None  # a tiny/CPU run alone renders nothing
    assert "not measured" in "\n".join(report.gpu_section(None))


# --- the --tiny run, end to end on NeMo's CPU path -----------------------------------------------
# `slow` (about 4 minutes; make test-all): the device run's rehearsal. Run it before a device run:
#   pytest -m slow tests/bench/test_gpu_lora_throughput.py

@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("bench_tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    # one micro batch per configuration (the sweep itself is tested above with faked trials)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_lora_throughput.py"), "--tiny",
                           "--time-budget", "0", "--work-dir", str(out / "work"), "--results", str(out / "results")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    files = sorted((out / "results").glob("gpu_lora_throughput_tiny-cpu_*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), proc.stdout, out


@pytest.mark.megatron_cpu
@pytest.mark.slow
def test_tiny_run_measures_every_configuration(tiny_results):
    result, stdout, _ = tiny_results
    assert result["mode"] == "tiny-cpu" and result["complete"] is True and result["failed_step"] is None
    for config in CONFIGS:
        best = result["configurations"][config]["best"]["128"]
        assert best["status"] == "ok" and best["micro_batch"] == 2
        assert best["tokens_per_s"] > 0 and best["tflops_per_s"] > 0 and best["mfu"] is None  # no peak on CPU
        assert best["measured_steps"] == best["steps"] - 2 and best["peak_memory_mb"] > 0
        assert best["step_time_s"]["p10"] <= best["step_time_s"]["median"] <= best["step_time_s"]["p90"]
        assert set(results.TRIAL_FIELDS) <= set(best)
    megatron = result["configurations"]["megatron"]["trials"][0]
    assert megatron["parity_run"] is True and megatron["steps"] == 6
    rows = [json.loads(x) for x in Path(megatron["log"]).read_text().splitlines()]
    assert [r["trainer/global_step"] for r in rows if "perf/tokens_per_s" in r] == list(range(1, 7))
    for seq, ratios in result["ratios"].items():
        assert set(ratios) == {"megatron_over_plain", "megatron_over_hf_backend", "hf_backend_over_plain"}
        assert all(v > 0 for v in ratios.values())
    skipped = [t for e in result["configurations"].values() for t in e["trials"] if t["status"] == "skipped"]
    assert len(skipped) == 3
    assert "parity: max |logit diff|" in stdout


@pytest.mark.megatron_cpu
@pytest.mark.slow
def test_tiny_run_parity_numbers(tiny_results):
    parity = tiny_results[0]["parity"]
    agreement = parity["nemo_vs_peft"]
    assert parity["steps"] == 6 and parity["prompts"] == 32 and parity["prompt_tokens"] == 64
    assert agreement["positions"] == 32 * 64
    assert agreement["max_abs_diff"] <= 1e-4  # fp32 on CPU: summation order only
    assert agreement["top1_agreement"] == 1.0 and 0.0 <= agreement["mean_kl"] <= 1e-9
    assert {c["check"] for c in parity["export_checks"]} == {"trained_vs_nemo_merged", "nemo_merged_vs_hf_merged",
                                                         "peft_adapter_vs_hf_merged"}
    assert all(c["ok"] for c in parity["export_checks"] + parity["import_checks"])
    assert [c["check"] for c in parity["import_checks"]] == ["hf_base_vs_nemo_import"]
    trip = parity["round_trip"]
    assert trip["max_abs_diff"] == 0.0 and trip["tensors_compared"] >= 4 * 12
    assert trip["only_in_base"] == [] and trip["shape_mismatch"] == []


@pytest.mark.megatron_cpu
@pytest.mark.slow
def test_tiny_results_file_has_every_documented_field(tiny_results, monkeypatch):
    result, _, out = tiny_results
    assert list(result) == list(results.RESULT_FIELDS)
    assert result["command"].startswith("python bench/gpu_lora_throughput.py --tiny")
    assert result["machine"]["cpus"] >= 1 and "gpu" not in result["machine"]
    for name in ("torch", "nemo_toolkit", "megatron-core", "transformers", "peft"):
        assert result["versions"][name], name
    assert result["versions"]["jp_peft_commit"] or not (REPO / ".git").exists()  # a copy without .git has none
    assert result["model"]["parameters"] > 0 and result["model"]["hf_config"]["model_type"] == "qwen2"
    workload = result["workload"]
    assert workload["lora"]["rank"] == 32 and len(workload["lora"]["targets"]) == 7
    assert workload["flops_per_token"]["128"] > 0 and workload["peak_tflops"] is None
    assert [s["step"] for s in result["steps"]][:5] == ["environment", "base model", "workload", "import", "data"]
    assert result["targets"] is None
    monkeypatch.setattr(report, "RESULTS", out / "results")
    assert report.latest_gpu() is None  # never rendered into the GPU table
