"""Greedy answers of a model (optionally with a PEFT adapter) to the bundled Japanese prompts
(`tasks/prompts/ja_generation_prompts.jsonl`): samples to read next to the scores, not a metric."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jp_peft.evaluation.harness import check_model_dirs, default_dtype, resolve_device
from jp_peft.evaluation.tasks import bundled_file

PROMPTS_FILE = ("prompts", "ja_generation_prompts.jsonl")


def load_prompts() -> list[dict[str, str]]:
    """The bundled prompts, [{"id", "prompt"}], in file order."""
    text = bundled_file(*PROMPTS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _model_input(tokenizer, prompt: str, chat: bool) -> str:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def _stop_ids(tokenizer) -> list[int]:
    """EOS, plus the chat template's end-of-turn token when the vocabulary has one (Qwen: <|im_end|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id and end_of_turn not in ids:
        ids.append(end_of_turn)
    return ids


def blank_ids(tokenizer) -> list[int]:
    """Tokens that decode to nothing but whitespace (stop and special tokens included): barred as the first
    new token, since a tiny model's greedy answer was otherwise spaces and EOS, an empty sample."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    return [i for i, text in enumerate(texts) if not text.strip()]


def generate_samples(model_dir: str | Path, adapter_dir: str | Path | None = None, *,
                     prompts: Sequence[dict[str, str]] | None = None, max_new_tokens: int = 64,
                     device: str | None = None, dtype: str | None = None) -> list[dict[str, Any]]:
    """Greedy decoding, one prompt at a time (no padding), with the tokenizer's chat template when it
    has one. Returns [{"id", "prompt", "output"}] in prompt order."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path, adapter_path = check_model_dirs(model_dir, adapter_dir)
    device = resolve_device(device)
    torch_dtype = getattr(torch, dtype or default_dtype(device))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    model.to(device).eval()
    chat = bool(getattr(tokenizer, "chat_template", None))
    stop = _stop_ids(tokenizer)
    blank = blank_ids(tokenizer)
    rows = []
    for item in (load_prompts() if prompts is None else prompts):
        ids = tokenizer(_model_input(tokenizer, item["prompt"], chat), return_tensors="pt",
                        add_special_tokens=False, return_token_type_ids=False).to(device)
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 begin_suppress_tokens=blank,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0])
        new_tokens = out[0, ids["input_ids"].shape[1]:]
        rows.append({"id": item["id"], "prompt": item["prompt"],
                     "output": tokenizer.decode(new_tokens, skip_special_tokens=True).strip()})
    return rows


def write_samples(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """JSON Lines, UTF-8, unescaped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
