"""The real-shape base's builder (jp_peft.models.real_shape), without building the 2 GB directory: the
architecture it builds counted on the meta device, its weight writer on a small config, its tokenizer's ids
against the config's. The built directory through the pipeline: tests/integration/test_real_shape_pipeline.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jp_peft.models import real_shape, shapes
from jp_peft.models import qwen_tokenizer as qt

pytestmark = pytest.mark.unit

SMALL = {**shapes.QWEN25_05B_HF_CONFIG, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_window_layers": 2}


def test_the_built_architecture_has_qwen25_05b_parameter_count_and_ties_the_head():
    from transformers import AutoModelForCausalLM

    config = shapes.hf_config(shapes.QWEN25_05B_HF_CONFIG)
    assert shapes.parameter_count(config) == shapes.QWEN25_05B_PARAMETERS
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # one tensor: counted and stored once


def test_random_weights_are_seeded_bf16_values_and_the_tied_head_is_stored_once(tmp_path):
    from safetensors import safe_open

    counts = [real_shape.write_random_weights(tmp_path / name, shapes.hf_config(SMALL), seed=0) for name in "ab"]
    assert counts[0] == counts[1] == shapes.parameter_count(SMALL)
    tensors = []
    for name in "ab":
        with safe_open(tmp_path / name / "model.safetensors", "pt") as handle:
            tensors.append({key: handle.get_tensor(key) for key in handle.keys()})
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])  # the same seed, the same weights
    assert "lm_head.weight" not in tensors[0]  # tie_word_embeddings: the head is the embedding
    embed = tensors[0]["model.embed_tokens.weight"]
    assert embed.dtype == torch.float32 and torch.equal(embed, embed.to(torch.bfloat16).float())
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config.get("dtype", config.get("torch_dtype")) == "float32"


def test_the_real_tokenizer_ids_fit_the_real_config():
    if not qt.npm_tokenizer_json().is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{qt.NPM_PACKAGE} is not cached (CI runs `{qt.SETUP_COMMAND}`)")
        pytest.skip(f"{qt.NPM_PACKAGE}@{qt.NPM_VERSION} is not cached: run `{qt.SETUP_COMMAND}`")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qt.ensure_qwen25_tokenizer(log=lambda m: None))
    config = shapes.QWEN25_05B_HF_CONFIG
    assert tokenizer.eos_token_id == config["eos_token_id"] == config["bos_token_id"] == 151643
    assert len(tokenizer) == qt.QWEN25_VOCAB <= config["vocab_size"]  # the real model pads its vocabulary too
    # the key names the tokenizer it copies: another tokenizer build is another directory
    assert real_shape.real_shape_path(log=lambda m: None).name.startswith(real_shape.PREFIX)
    assert real_shape.real_shape_path(log=lambda m: None) == real_shape.real_shape_path(log=lambda m: None)
