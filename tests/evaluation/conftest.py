"""Fixtures of the evaluation tests: one scored run of the tiny base model, and a random LoRA adapter
on it with its merged twin. Everything runs offline."""

from __future__ import annotations

import os

import pytest

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

# Shared by the by-hand check and the adapter check: bundled JCommonsenseQA-like task, 0-shot, 5 items.
JCQA_RUN = dict(tasks="jpeft_jcqa", num_fewshot=0, limit=5, batch_size=4, device="cpu", samples=True)


@pytest.fixture(scope="session")
def jcqa_run():
    return dict(JCQA_RUN)


@pytest.fixture(scope="session")
def jcqa_base(tiny_base, jcqa_run):
    from jp_peft.evaluation.harness import evaluate

    return evaluate(tiny_base, **jcqa_run)


@pytest.fixture(scope="session")
def lora_pair(tiny_base, tmp_path_factory):
    """(adapter_dir, merged_dir): a LoRA with random A and B on every projection of the tiny model,
    saved as a PEFT adapter, and the same weights merged into a plain model (+ tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    model.save_pretrained(root / "adapter")
    model.merge_and_unload().save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(root / "merged")
    return root / "adapter", root / "merged"


@pytest.fixture(scope="session")
def jnli_rows():
    """Rows in JGLUE JNLI's columns (sentence1, sentence2, label), text written for these tests."""
    return [
        {"sentence_pair_id": "t1", "yjcaptions_id": "x", "sentence1": "男性が自転車に乗っている。",
         "sentence2": "男性が乗り物に乗っている。", "label": 0},
        {"sentence_pair_id": "t2", "yjcaptions_id": "x", "sentence1": "猫がソファで寝ている。",
         "sentence2": "猫が走り回っている。", "label": 1},
        {"sentence_pair_id": "t3", "yjcaptions_id": "x", "sentence1": "子供が公園で遊んでいる。",
         "sentence2": "子供は友達と遊んでいる。", "label": 2},
    ]
