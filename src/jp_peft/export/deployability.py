"""Where each exported artifact is shown to run and where it cannot: the export record's `deployability`.

Per artifact (hf_adapter, hf_merged, nemo), one entry per target: `verified` with the parity numbers that
show it (transformers + PEFT, NeMo: the export checks), `refused` with the reason (a `lora_embed` adapter in
vLLM and llama.cpp), or `not verified here` with the command to try. llama.cpp becomes `verified` when
`jp-peft export gguf` passed its checks (with_gguf), vLLM when `jp-peft serve --check` did (export/vllm_serve.py).
Pure: reads no model, imports no torch (the planner uses it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jp_peft.spec import ExperimentSpec

VERIFIED, REFUSED, NOT_VERIFIED = "verified", "refused", "not verified here"
TRANSFORMERS, TRANSFORMERS_PEFT, VLLM, LLAMA_CPP, NEMO = "transformers", "transformers+peft", "vllm", "llama.cpp", "nemo"
ARTIFACTS = ("hf_adapter", "hf_merged", "nemo")

# vllm/config/lora.py: `max_lora_rank: MaxLoRARanks = 16`, MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320,
# 512]; an adapter of a higher rank than --max-lora-rank is refused when it loads.
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_REFUSES_MODULES_TO_SAVE = ("vllm: refuses modules_to_save (vllm/lora/peft_helper.py _validate_features: "
                                "\"vLLM only supports modules_to_save being None\"); use hf_merged")
LLAMA_CPP_REFUSES_EMBEDDINGS = ("llama.cpp: convert_lora_to_gguf.py refuses non-LoRA tensors (embeddings: "
                                "\"Embeddings is present in the adapter\") and a LoRA of the tied lm_head; use hf_merged")

# The export checks (jp_peft.export.parity) that show an artifact loads and computes the trained model, per
# artifact and target: the adapter on its base in PEFT; the merged model in transformers (hf: against the trained
# model; Megatron: against the merged NeMo checkpoint, itself checked against the trained one); the .nemo archive
# holds nemo_merged/ byte for byte (nemo_archive.verify_nemo_archive), whose Megatron forward was checked.
CHECKS = {"hf_adapter": (TRANSFORMERS_PEFT, ("peft_adapter_vs_hf_merged",)),
          "hf_merged": (TRANSFORMERS, ("hf_merged_vs_trained", "nemo_merged_vs_hf_merged")),
          "nemo": (NEMO, ("trained_vs_nemo_merged", "nemo_merged_vs_hf_merged"))}
CHECK_FIELDS = ("check", "max_abs_diff", "atol", "argmax_agreement", "positions")


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that serves a rank-`rank` adapter (None: above all of them)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def read_adapter_config(adapter_dir: str | Path | None) -> dict[str, Any] | None:
    if adapter_dir is None or not (Path(adapter_dir) / "adapter_config.json").is_file():
        return None
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))


def served_name(spec: ExperimentSpec, stage: str) -> str:
    """The name a server gives the stage's adapter (`--lora-modules NAME=PATH`) and its model cards' title."""
    return f"{spec.name}-{stage}"


def _verified(artifact: str, checks: list[dict[str, Any]]) -> dict[str, Any] | None:
    target, names = CHECKS[artifact]
    found = [{k: c.get(k) for k in CHECK_FIELDS} for c in checks if c.get("check") in names and c.get("ok")]
    return {"target": target, "status": VERIFIED, "checks": found} if found else None


def adapter_targets(adapter_dir: str, adapter_base: str, adapter_config: dict[str, Any], name: str) -> list[dict]:
    """vLLM and llama.cpp for a PEFT adapter: refused when it saves whole modules (lora_embed), else the command."""
    if adapter_config.get("modules_to_save"):
        return [{"target": VLLM, "status": REFUSED, "reason": VLLM_REFUSES_MODULES_TO_SAVE},
                {"target": LLAMA_CPP, "status": REFUSED, "reason": LLAMA_CPP_REFUSES_EMBEDDINGS}]
    rank = int(adapter_config["r"])
    needed = vllm_max_lora_rank(rank)
    if needed is None:
        vllm = {"target": VLLM, "status": REFUSED, "rank": rank,
                "reason": f"vllm: rank {rank} is above the largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); "
                          "use hf_merged"}
    else:
        vllm = {"target": VLLM, "status": NOT_VERIFIED, "rank": rank, "max_lora_rank": needed,
                "command": f"vllm serve {adapter_base} --enable-lora --lora-modules {name}={adapter_dir} "
                           f"--max-lora-rank {needed}",
                "note": f"vLLM's default --max-lora-rank is {VLLM_DEFAULT_MAX_LORA_RANK}"}
    return [vllm, {"target": LLAMA_CPP, "status": NOT_VERIFIED,
                   "note": "a GGUF LoRA by llama.cpp's convert_lora_to_gguf.py: jp-peft export gguf RUN_DIR --stage STAGE"}]


def deployability(record, name: str, adapter_config: dict[str, Any] | None = None) -> dict[str, list[dict]]:
    """{artifact: [target entry, ...]} for every artifact `record` (an ExportRecord) names."""
    out: dict[str, list[dict]] = {}
    if record.hf_adapter is not None:
        if adapter_config is None:
            adapter_config = read_adapter_config(record.hf_adapter) or {}
        if record.method == "lora_embed" and not adapter_config.get("modules_to_save"):
            adapter_config = {**adapter_config, "modules_to_save": ["embed_tokens", "lm_head"]}  # what the method saves
        verified = _verified("hf_adapter", record.checks)
        out["hf_adapter"] = [*([verified] if verified else []),
                             *adapter_targets(record.hf_adapter, record.adapter_base, adapter_config, name)]
    verified = _verified("hf_merged", record.checks)
    out["hf_merged"] = [*([verified] if verified else []),
                        {"target": VLLM, "status": NOT_VERIFIED, "command": f"vllm serve {record.hf_merged}"},
                        {"target": LLAMA_CPP, "status": NOT_VERIFIED,
                         "note": "GGUF by llama.cpp's convert_hf_to_gguf.py: jp-peft export gguf RUN_DIR --stage STAGE"}]
    if record.nemo is not None:
        verified = _verified("nemo", record.checks)
        out["nemo"] = [verified] if verified else []
    return out


def with_gguf(deploy: dict[str, list[dict]], gguf: dict[str, Any]) -> dict[str, list[dict]]:
    """The record's deployability once `jp-peft export gguf` passed: llama.cpp verified for hf_merged (through
    gguf/model-<type>.gguf) and for a lora adapter (gguf/lora-f16.gguf on gguf/base-f16.gguf), with the checks;
    a refusal (lora_embed) stays as it was."""
    checks = {c["check"]: c for c in gguf["checks"]}
    fields = CHECK_FIELDS + ("ppl_ratio", "f16_gap", "tokens_equal")

    def entry(names: list[str], via: list[str]) -> dict[str, Any]:
        return {"target": LLAMA_CPP, "status": VERIFIED, "via": via,
                "checks": [{k: checks[n].get(k) for k in fields if k in checks[n]} for n in names]}

    out = {artifact: [e for e in entries if not (e["target"] == LLAMA_CPP and e["status"] != REFUSED)]
           for artifact, entries in deploy.items()}
    models = [n for n in checks if n.startswith("gguf_") and n.endswith("_vs_hf_merged") and n != "gguf_lora_vs_hf_merged"]
    out.setdefault("hf_merged", []).append(
        entry(models, [f["path"] for name, f in gguf["files"].items() if name.startswith("model-")]))
    if "gguf_lora_vs_hf_merged" in checks:
        out.setdefault("hf_adapter", []).append(
            entry(["gguf_lora_vs_hf_merged"], [gguf["files"]["lora-f16"]["path"], gguf["files"]["base-f16"]["path"]]))
    return out


def check_detail(check: dict[str, Any]) -> str:
    """One check of a verified entry in words: a logit bound (exports, f16 GGUF), argmax and perplexity (q8_0
    GGUF), or greedy tokens and logprobs (vLLM)."""
    where = f"over {check.get('positions')} positions"
    if "max_abs_logprob_diff" in check:
        return (f"{check['check']}: greedy tokens {'equal' if check['greedy_equal'] else 'different'}, max abs "
                f"logprob diff {check['max_abs_logprob_diff']:.2e} <= {check['atol']:.0e} {where}")
    if check.get("ppl_ratio") is not None:
        return (f"{check['check']}: argmax agreement {check['argmax_agreement']:.3f}, perplexity ratio "
                f"{check['ppl_ratio']:.4f} {where}")
    return (f"{check['check']}: max abs logit diff {check['max_abs_diff']:.2e} <= {check['atol']:.0e} {where}, "
            f"argmax agreement {check['argmax_agreement']:.3f}")


def summary_line(entries: list[dict[str, Any]]) -> str:
    """One line for `jp-peft status`: each target, its status and its number or reason, in short."""
    parts = []
    for entry in entries:
        text = f"{entry['target']} {entry['status']}"
        if entry["status"] == VERIFIED:
            logits = [c["max_abs_diff"] for c in entry["checks"] if c.get("atol") is not None and "max_abs_diff" in c]
            logprobs = [c["max_abs_logprob_diff"] for c in entry["checks"] if "max_abs_logprob_diff" in c]
            text += (f" (max |logit diff| {max(logits):.1e})" if logits else
                     f" (max |logprob diff| {max(logprobs):.1e})" if logprobs else "")
        elif entry["status"] == REFUSED:
            text += f" ({entry['reason'].split(': ', 1)[1].split(' (')[0]})"
        elif "max_lora_rank" in entry:
            text += f" (needs --max-lora-rank {entry['max_lora_rank']})"
        parts.append(text)
    return "; ".join(parts)


def unservable_adapter_warnings(spec: ExperimentSpec) -> list[str]:
    """One line per trained stage whose method makes an adapter that vLLM and llama.cpp refuse (lora_embed)."""
    return [f"{stage}.method=lora_embed: its hf_adapter saves embed_tokens/lm_head (modules_to_save), which vLLM "
            f"and llama.cpp refuse; serve {stage}/hf_merged instead" for stage in spec.trained_stages
            if spec.stage(stage).method == "lora_embed"]
