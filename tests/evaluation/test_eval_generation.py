"""Greedy samples for the bundled Japanese prompts: one row per prompt, the same every time."""

from __future__ import annotations

import json

import pytest

from jp_peft.evaluation.generation import blank_ids, generate_samples, load_prompts, write_samples
from jp_peft.evaluation.tasks import bundled_file

pytestmark = pytest.mark.integration


def test_one_row_per_bundled_prompt_and_deterministic(tiny_base, tmp_path):
    lines = bundled_file("prompts", "ja_generation_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    expected = [json.loads(line) for line in lines if line.strip()]
    assert load_prompts() == expected and len(expected) == 20

    first = generate_samples(tiny_base, max_new_tokens=8, device="cpu")
    second = generate_samples(tiny_base, max_new_tokens=8, device="cpu")
    assert first == second
    assert [(r["id"], r["prompt"]) for r in first] == [(p["id"], p["prompt"]) for p in expected]
    assert all(set(r) == {"id", "prompt", "output"} and isinstance(r["output"], str) for r in first)
    # Each output is the greedy continuation, decoded: an argmax loop by hand over the chat-formatted prompt,
    # whitespace, stop and special tokens barred as the first token (the tiny base's first choices were spaces
    # and EOS), then stopped at EOS or <|im_end|>: no output is empty
    for row, item in zip(first[:3], expected[:3]):
        assert row["output"] == _greedy_by_hand(tiny_base, item["prompt"], 8)
    assert all(r["output"] for r in first), [r["output"] for r in first]

    path = write_samples(tmp_path / "samples.jsonl", first)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == first


def test_adapter_generates_like_the_merged_model(tiny_base, lora_pair):
    adapter_dir, merged_dir = lora_pair
    prompts = load_prompts()[:4]
    with_adapter = generate_samples(tiny_base, adapter_dir, prompts=prompts, max_new_tokens=8, device="cpu")
    assert with_adapter == generate_samples(merged_dir, prompts=prompts, max_new_tokens=8, device="cpu")
    for row, item in zip(with_adapter, prompts):  # the adapter is applied: its greedy answer, by hand
        assert row["output"] == _greedy_by_hand(merged_dir, item["prompt"], 8)


def _greedy_by_hand(model_dir, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids).logits[0, -1]
            if not new:
                logits[blank_ids(tokenizer)] = float("-inf")
            token = int(logits.argmax())
            new.append(token)
            if token in stop:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()
