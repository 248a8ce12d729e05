"""The hf backend's training methods on the embedded tiny Qwen2 (tied embeddings): exactly which
parameters train, their learning rates, the FLOP accounting, what is exported, and that every export
reproduces the trained model."""

import json

import pytest
import torch

from jp_peft.backends.hf import methods as hf_methods
from jp_peft.training.flops import lora_flops_per_token, method_flops_per_token, shape_of_hf_config
from jp_peft.export import parity
from jp_peft.spec import METHODS, LoraSpec, StageSpec, TrainSpec
from jp_peft.training.flops import model_flops_per_token

pytestmark = pytest.mark.unit

LORA = LoraSpec(rank=4, alpha=8, dropout=0.0)


def _expected(config, method):
    """Trainable and total parameter counts worked out from the config, not from the model. lora_embed trains
    a copy of the (tied) embedding in place of the original: one V x h matrix, counted once."""
    h, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    f = config.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
    lora = layers * sum(LORA.rank * (i + o) for i, o in shapes.values())
    base = layers * (sum(i * o for i, o in shapes.values()) + 2 * h + kv * 2 + h) + v * h + h  # + q/k/v biases, norms
    return {"lora": (lora, base + lora), "lora_embed": (lora + v * h, base + lora), "full": (base, base)}[method]


@pytest.fixture(scope="module")
def models(tiny_base):
    torch.manual_seed(0)
    out = {}
    for method in METHODS:
        model = hf_methods.build_model(str(tiny_base), method, LORA)
        with torch.no_grad():  # a "trained" model: every trainable tensor moved
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        out[method] = model.eval()
    return out


@pytest.mark.parametrize("method", METHODS)
def test_exactly_the_methods_parameters_train(models, method):
    model = models[method]
    trainable, total = hf_methods.count_params(model)
    assert (trainable, total) == _expected(model.config, method)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "lora":
        assert all("lora_" in n for n in names)
    if method == "lora_embed":
        assert all("lora_" in n or ".modules_to_save." in n for n in names)
        assert any("embed_tokens.modules_to_save" in n for n in names)
    if method == "full":
        assert trainable == sum(p.numel() for p in model.parameters())


def test_lora_embed_keeps_the_tie_while_training_and_after_merging(models):
    model = models["lora_embed"]
    assert model.config.tie_word_embeddings
    inner = model.base_model.model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # one trainable matrix, both roles
    merged = hf_methods.merged_model(model)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


@pytest.mark.parametrize("method, groups", [("lora", [("main", 1e-3)]), ("full", [("main", 1e-3)]),
                                            ("lora_embed", [("main", 1e-3), ("embed", 1e-4)])])
def test_learning_rate_groups(models, method, groups):
    found = hf_methods.param_groups(models[method], method, TrainSpec(lr=1e-3, embed_lr=1e-4))
    assert [(g["name"], g["lr"]) for g in found] == groups
    assert sum(p.numel() for g in found for p in g["params"]) == hf_methods.count_params(models[method])[0]
    default = hf_methods.param_groups(models[method], method, TrainSpec(lr=1e-3))
    assert all(g["lr"] == 1e-3 for g in default)  # embed_lr unset: the stage's lr


def test_flops_follow_the_method(models):
    shape, seq = shape_of_hf_config(models["lora"].config), 256
    lora = lora_flops_per_token(shape, seq, LORA.rank, LORA.target_modules)
    head = shape.vocab * shape.hidden
    assert method_flops_per_token(shape, seq, "lora", LORA.rank, LORA.target_modules) == lora
    assert method_flops_per_token(shape, seq, "lora_embed", LORA.rank, LORA.target_modules) == lora + 2 * head
    full = method_flops_per_token(shape, seq, "full")
    assert full == pytest.approx(6 * shape.frozen_linear_params() + 12 * shape.num_layers * seq * shape.hidden)
    for method in METHODS:  # what the hf backend's step metrics use
        stage = StageSpec(method=method, data=StageSpec().data.__class__(seq_length=seq))
        assert model_flops_per_token(models[method], stage) == method_flops_per_token(
            shape, seq, method, LORA.rank, sorted(LORA.target_modules) if method != "full" else ())


@pytest.mark.parametrize("method", METHODS)
def test_exports_follow_the_method_and_reproduce_the_trained_model(models, method, tiny_base, tmp_path):
    from transformers import AutoTokenizer

    model = models[method]
    written = hf_methods.export(model, AutoTokenizer.from_pretrained(str(tiny_base)), str(tiny_base),
                                tmp_path / "hf_adapter", tmp_path / "hf_merged")
    ids = parity.random_ids(model.config.vocab_size, length=32)
    with torch.no_grad():
        trained = model(input_ids=ids).logits.float()
    merged = parity.hf_logits(tmp_path / "hf_merged", ids)
    assert (merged - trained).abs().max() < parity.FP32_ATOL
    assert (merged - parity.hf_logits(tiny_base, ids)).abs().max() > 1e-3  # training did change the model
    if method == "full":
        assert set(written) == {"hf_merged"} and not (tmp_path / "hf_adapter").exists()
        return
    assert set(written) == {"hf_adapter", "hf_merged"}
    config = json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base.resolve())
    if method == "lora_embed":
        # PEFT saves the embedding and re-ties the output layer to it on load (ensure_weight_tying)
        assert any(m.endswith("embed_tokens") for m in config["modules_to_save"]) and config["ensure_weight_tying"]
        from safetensors.torch import load_file
        saved = load_file(tmp_path / "hf_adapter" / "adapter_model.safetensors")
        assert any("embed_tokens" in k and "lora_" not in k for k in saved)
    else:
        assert not config.get("modules_to_save")
    adapter = parity.peft_logits(tmp_path / "hf_adapter", ids)  # loadable by PEFT, on the base it names
    assert (adapter - trained).abs().max() < parity.FP32_ATOL


def test_a_4bit_base_trains_after_an_evaluation_and_evaluates_as_it_trains(tiny_base):
    """QLoRA on CPU: a validation (eval mode, no grad) and then a training step, as every stage runs them. On a
    CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight for inference at the first eval forward;
    the next training forward then failed in matmul_4bit's packed path ("a view of a leaf Variable that requires
    grad is being used in an in-place operation"). The eval logits must also be the training kernel's."""
    pytest.importorskip("bitsandbytes")
    from jp_peft.spec import ModelSpec

    torch.manual_seed(0)
    model = hf_methods.build_model(str(tiny_base), "lora", LORA, model_spec=ModelSpec(quantization="nf4"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    model.train()
    trained = model(input_ids=ids, labels=ids)
    trained.loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)
    assert torch.equal(evaluated, trained.logits.detach())  # dropout 0: one kernel for eval and training
