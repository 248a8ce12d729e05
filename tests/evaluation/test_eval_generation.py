"""Greedy samples for the bundled Japanese prompts: one row per prompt, the same every time."""

from __future__ import annotations

import json

import pytest

from jp_peft.evaluation.generation import generate_samples, load_prompts, write_samples
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
    assert any(r["output"] for r in first)  # the tiny model does say something

    path = write_samples(tmp_path / "samples.jsonl", first)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == first


def test_adapter_generates_like_the_merged_model(tiny_base, lora_pair):
    adapter_dir, merged_dir = lora_pair
    prompts = load_prompts()[:4]
    with_adapter = generate_samples(tiny_base, adapter_dir, prompts=prompts, max_new_tokens=8, device="cpu")
    assert with_adapter == generate_samples(merged_dir, prompts=prompts, max_new_tokens=8, device="cpu")
    assert with_adapter != generate_samples(tiny_base, prompts=prompts, max_new_tokens=8, device="cpu")
