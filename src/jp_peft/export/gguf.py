"""GGUF for llama.cpp: a trained stage's merged model (f16, q8_0) and its `lora` adapter (a GGUF LoRA against a
GGUF of the base it names), written under STAGE/gguf/ and checked like every export before the record says so.

    jp-peft export gguf RUN_DIR --stage sft --type f16,q8_0

The converters are llama.cpp's own, from the llama-cpp-python sdist pinned below, unpacked into the cache once
by `make deploy-tools` (scripts/deploy_tools.sh), never fetched at run time; they run in a process of their own
(export/gguf_convert.py, which names the one adaptation). The checks load the GGUF files in llama-cpp-python and
compare their logits with the Hugging Face fp32 model's on the bundled Japanese prompts, token ids fed as is:

  f16 (model, and base + LoRA)  max |logit diff| within twice what rounding the weights to fp16 alone moves the
                                HF model's logits (measured on the same ids: `f16_gap`), + 1e-3 for summation
                                order; the tokenizer too: llama.cpp's tokens of each prompt == HF's.
  q8_0                          argmax agreement >= 0.9 and perplexity on the prompts within 5% of the HF model's
                                (8-bit blocks move logits by more than fp16 does; what must hold is the ranking)

A `lora_embed` adapter is refused (convert_lora_to_gguf.py takes no saved embeddings); its merged model is
exported instead. Method `full` has no adapter. The record goes into export.json (`gguf`, and the llama.cpp
entries of `deployability`).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jp_peft.records import layout as rundir
from jp_peft.records.export_record import ExportRecord
from jp_peft.resources import sha256_file
from jp_peft.spec import ExperimentSpec

LLAMA_CPP_PYTHON = "0.3.36"  # scripts/deploy_tools.sh VERSION: keep the two equal
TYPES = ("f16", "q8_0")
F16_ATOL_EXTRA = 1e-3
Q8_MIN_AGREEMENT, Q8_MAX_PPL_RATIO = 0.9, 1.05
DEPLOY_TOOLS = "make deploy-tools (scripts/deploy_tools.sh: builds llama.cpp's converters and llama-cpp-python " \
               "once into the cache, about 5 minutes of build on 2 cores)"


class GGUFError(ValueError):
    """A GGUF export cannot start (tools missing, a bad type); the message says what to do."""


class ConversionError(RuntimeError):
    """One of llama.cpp's converters failed; the message has the end of its output."""


def tools_dir() -> Path:
    from jp_peft.tiny import cache_root

    return cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


def converter_dir() -> Path:
    found = tools_dir() / "llama.cpp"
    if not (found / "convert_hf_to_gguf.py").is_file() or not (found / "convert_lora_to_gguf.py").is_file():
        raise GGUFError(f"llama.cpp's converters are not in {found}: run {DEPLOY_TOOLS}")
    return found


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise GGUFError(f"llama-cpp-python is not installed: run {DEPLOY_TOOLS}") from None
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        raise GGUFError(f"llama-cpp-python {llama_cpp.__version__} is installed, jp-peft pins {LLAMA_CPP_PYTHON}: "
                        f"run {DEPLOY_TOOLS}")
    return llama_cpp


def _convert(script: str, args: list[str], out: Path, log: Callable[[str], None]) -> None:
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # a stopped conversion leaves no half file under the real name
    proc = subprocess.run([sys.executable, "-m", "jp_peft.export.gguf_convert", str(converter_dir()), script, *args,
                           "--outfile", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ConversionError(f"{script} failed for {out.name} (exit {proc.returncode}):\n" + proc.stderr[-3000:])
    tmp.replace(out)
    log(f"[jp-peft] gguf: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - started:.0f} s)")


def convert_model(hf_dir: str | Path, out: Path, gguf_type: str, log=print) -> None:
    _convert("convert_hf_to_gguf.py", [str(hf_dir), "--outtype", gguf_type], out, log)


def convert_lora(adapter_dir: str | Path, base_dir: str | Path, out: Path, log=print) -> None:
    _convert("convert_lora_to_gguf.py", ["--base", str(base_dir), "--outtype", "f16", str(adapter_dir)], out, log)


def hf_logits(hf_dir: str | Path, ids: list[list[int]], f16_weights: bool = False):
    """(positions, vocab) fp32 logits of every prompt, concatenated; `f16_weights`: the weights rounded to fp16
    first (computed in fp32), which is what an f16 GGUF holds."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    if f16_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([row])).logits[0].float() for row in ids])


def llama_logits(gguf: Path, ids: list[list[int]], lora: Path | None = None, texts: list[str] | None = None):
    """llama.cpp's logits for the same ids (and, with `texts`, whether its tokenizer gives those ids)."""
    import numpy as np
    import torch

    llama_cpp = require_llama_cpp()
    model = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=512,
                            logits_all=True, n_threads=2, verbose=False, seed=0)
    rows, tokens_equal = [], True
    for i, row in enumerate(ids):
        model.reset()
        model.eval(row)
        rows.append(torch.from_numpy(np.array(model.scores[: len(row)], dtype=np.float32)))
        if texts is not None:
            tokens_equal &= model.tokenize(texts[i].encode("utf-8"), add_bos=False, special=False) == row
    return torch.cat(rows), tokens_equal


def _perplexity(logits, ids: list[list[int]]) -> float:
    import torch

    losses, start = [], 0
    for row in ids:
        n = len(row)
        losses.append(torch.nn.functional.cross_entropy(logits[start:start + n - 1].double(),
                                                        torch.tensor(row[1:]), reduction="sum"))
        start += n
    return math.exp(float(sum(losses)) / sum(len(r) - 1 for r in ids))


def f16_check(name: str, got, reference, gap: float, tokens_equal: bool) -> dict[str, Any]:
    from jp_peft.export.parity import check

    atol = 2 * gap + F16_ATOL_EXTRA
    result = check(name, got[None], reference[None], atol, f"fp16 weights: rounding the HF model's weights to fp16 alone moves "
                   f"its logits by {gap:.3e} on these ids; bound twice that + {F16_ATOL_EXTRA:g}")
    return {**result, "f16_gap": gap, "tokens_equal": tokens_equal, "ok": result["ok"] and tokens_equal}


def q8_check(name: str, got, reference, ids) -> dict[str, Any]:
    from jp_peft.export.parity import check

    result = check(name, got[None], reference[None], math.inf, f"8-bit blocks: argmax agreement >= {Q8_MIN_AGREEMENT} and "
                   f"perplexity within {Q8_MAX_PPL_RATIO - 1:.0%} of the HF model's on the bundled prompts")
    ratio = _perplexity(got, ids) / _perplexity(reference, ids)
    ok = result["argmax_agreement"] >= Q8_MIN_AGREEMENT and ratio <= Q8_MAX_PPL_RATIO
    return {**result, "atol": None, "ppl_ratio": ratio, "ok": ok}


def export_gguf(spec: ExperimentSpec, stage: str, types: tuple[str, ...] = ("f16",), log=print) -> dict[str, Any]:
    """Write STAGE/gguf/ for a trained stage's export, check it, and record it in export.json."""
    from jp_peft.export.deployability import LLAMA_CPP_REFUSES_EMBEDDINGS, with_gguf
    from jp_peft.export.model_card import refresh_cards
    from jp_peft.export.parity import prompt_ids, require

    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise GGUFError(f"--type: {', '.join(unknown)} is not one of {', '.join(TYPES)}")
    record_path = rundir.export_record(spec, stage)
    record = ExportRecord.read(record_path, f"GGUF export of {stage}")
    converter_dir(), require_llama_cpp()  # both before any file is written
    out = rundir.gguf_dir(spec, stage)
    merged = Path(record.hf_merged)
    texts, ids = prompt_ids(merged)  # the bundled Japanese prompts
    reference = hf_logits(merged, ids)
    gap = float((hf_logits(merged, ids, f16_weights=True) - reference).abs().max())
    files, checks, refused = {}, [], None
    for gguf_type in types:
        path = out / f"model-{gguf_type}.gguf"
        convert_model(merged, path, gguf_type, log)
        got, tokens_equal = llama_logits(path, ids, texts=texts)
        checks.append(f16_check(f"gguf_{gguf_type}_vs_hf_merged", got, reference, gap, tokens_equal)
                      if gguf_type == "f16" else q8_check(f"gguf_{gguf_type}_vs_hf_merged", got, reference, ids))
        files[f"model-{gguf_type}"] = path
    if record.method == "lora_embed":
        refused = LLAMA_CPP_REFUSES_EMBEDDINGS
        log(f"[jp-peft] gguf: {stage}/hf_adapter not converted ({refused}); the merged model is exported")
    elif record.hf_adapter is not None:  # a lora adapter: against a GGUF of the base it names
        base, lora = out / "base-f16.gguf", out / "lora-f16.gguf"
        convert_model(record.adapter_base, base, "f16", log)
        convert_lora(record.hf_adapter, record.adapter_base, lora, log)
        got, tokens_equal = llama_logits(base, ids, lora=lora, texts=texts)
        checks.append(f16_check("gguf_lora_vs_hf_merged", got, reference, gap, tokens_equal))
        files.update({"base-f16": base, "lora-f16": lora})
    for c in checks:
        extra = (f"ppl ratio {c['ppl_ratio']:.5f}" if "ppl_ratio" in c
                 else f"<= {c['atol']:.2e}, tokens {'equal' if c['tokens_equal'] else 'DIFFER'}")
        log(f"[jp-peft] gguf {stage}: {c['check']} max |logit diff| {c['max_abs_diff']:.3e} ({extra}), argmax "
            f"agreement {c['argmax_agreement']:.3f} over {c['positions']} positions")
    require(checks, f"GGUF export of {stage}")
    gguf = {"llama_cpp_python": LLAMA_CPP_PYTHON, "checks": checks, "adapter_refused": refused,
            "files": {name: {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for name, p in files.items()}}
    record = dataclasses.replace(record, gguf=gguf, deployability=with_gguf(record.deployability, gguf))
    refresh_cards(spec, stage, record)
    record.write(record_path)
    return gguf
