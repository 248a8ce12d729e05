"""NeMo Megatron LoRA -> PEFT export is exact: deltas match Megatron's own QKV/fc1 slicing,
PEFT loads the adapter onto Qwen2ForCausalLM, and logits equal a hand-merged model."""

import pytest
import torch

from jp_peft.export.hf_peft import (AdapterExportError, hf_adapter_config, megatron_lora_to_hf_peft,
                                    register_qwen2_hf_peft_exporter, write_hf_peft_adapter)

pytestmark = pytest.mark.unit
PN = "module.decoder.layers.{i}."


def reference_qkv_split(fused: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Megatron's get_query_key_value_tensors: view [.., groups, (heads/groups + 2) * head_dim] and
    split the last dim into [heads/groups * head_dim, head_dim, head_dim] (written here from
    megatron.core, not from the exporter)."""
    rows, cols = fused.shape
    per_group = heads // groups
    view = fused.t().reshape(cols, groups, (per_group + 2) * head_dim)
    q, k, v = torch.split(view, [per_group * head_dim, head_dim, head_dim], dim=2)
    return (q.reshape(cols, heads * head_dim).t(), k.reshape(cols, groups * head_dim).t(),
            v.reshape(cols, groups * head_dim).t())


def reference_fc1_split(fused: torch.Tensor):
    """Megatron's SwiGLU: torch.chunk(fc1 output, 2, dim=-1) -> (gate, up)."""
    return torch.chunk(fused, 2, dim=0)


def megatron_tensors(layers, hidden, heads, groups, head_dim, ffn, rank, canonical, seed=0):
    g = torch.Generator().manual_seed(seed)
    def r(*shape):
        return torch.randn(*shape, generator=g)
    qkv_rows = (heads // groups + 2) * groups * head_dim
    out = {}
    for i in range(layers):
        p = PN.format(i=i)
        if canonical:
            for name, rows in (("adapter_q", heads * head_dim), ("adapter_k", groups * head_dim), ("adapter_v", groups * head_dim)):
                out[f"{p}self_attention.linear_qkv.adapter.{name}.linear_in.weight"] = r(rank, hidden)
                out[f"{p}self_attention.linear_qkv.adapter.{name}.linear_out.weight"] = r(rows, rank)
            for name in ("adapter_gate", "adapter_up"):
                out[f"{p}mlp.linear_fc1.adapter.{name}.linear_in.weight"] = r(rank, hidden)
                out[f"{p}mlp.linear_fc1.adapter.{name}.linear_out.weight"] = r(ffn, rank)
        else:
            out[f"{p}self_attention.linear_qkv.adapter.linear_in.weight"] = r(rank, hidden)
            out[f"{p}self_attention.linear_qkv.adapter.linear_out.weight"] = r(qkv_rows, rank)
            out[f"{p}mlp.linear_fc1.adapter.linear_in.weight"] = r(rank, hidden)
            out[f"{p}mlp.linear_fc1.adapter.linear_out.weight"] = r(2 * ffn, rank)
        out[f"{p}self_attention.linear_proj.adapter.linear_in.weight"] = r(rank, heads * head_dim)
        out[f"{p}self_attention.linear_proj.adapter.linear_out.weight"] = r(hidden, rank)
        out[f"{p}mlp.linear_fc2.adapter.linear_in.weight"] = r(rank, ffn)
        out[f"{p}mlp.linear_fc2.adapter.linear_out.weight"] = r(hidden, rank)
    return out


def reference_deltas(mt, layers, heads, groups, head_dim, scale, canonical):
    """HF projection name -> delta weight, computed from the Megatron tensors with Megatron's slicing."""
    deltas = {}
    for i in range(layers):
        p = PN.format(i=i)
        def d(prefix):
            return scale * mt[prefix + "linear_out.weight"] @ mt[prefix + "linear_in.weight"]
        if canonical:
            for hf, name in (("q_proj", "adapter_q"), ("k_proj", "adapter_k"), ("v_proj", "adapter_v")):
                deltas[(i, "self_attn", hf)] = d(f"{p}self_attention.linear_qkv.adapter.{name}.")
            for hf, name in (("gate_proj", "adapter_gate"), ("up_proj", "adapter_up")):
                deltas[(i, "mlp", hf)] = d(f"{p}mlp.linear_fc1.adapter.{name}.")
        else:
            q, k, v = reference_qkv_split(d(f"{p}self_attention.linear_qkv.adapter."), heads, groups, head_dim)
            deltas.update({(i, "self_attn", "q_proj"): q, (i, "self_attn", "k_proj"): k, (i, "self_attn", "v_proj"): v})
            gate, up = reference_fc1_split(d(f"{p}mlp.linear_fc1.adapter."))
            deltas.update({(i, "mlp", "gate_proj"): gate, (i, "mlp", "up_proj"): up})
        deltas[(i, "self_attn", "o_proj")] = d(f"{p}self_attention.linear_proj.adapter.")
        deltas[(i, "mlp", "down_proj")] = d(f"{p}mlp.linear_fc2.adapter.")
    return deltas


@pytest.mark.parametrize("heads, groups", [(14, 2), (8, 8), (16, 4)])
@pytest.mark.parametrize("canonical", [False, True])
def test_hf_deltas_equal_megatron_deltas(heads, groups, canonical):
    head_dim, ffn, rank, alpha, layers = 8, 48, 4, 8, 2
    hidden = heads * head_dim
    mt = megatron_tensors(layers, hidden, heads, groups, head_dim, ffn, rank, canonical)
    hf = megatron_lora_to_hf_peft(mt, num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim,
                                  adapter_type="canonical_lora" if canonical else "lora")
    scale = alpha / rank  # NeMo: alpha/dim; PEFT: lora_alpha/r -- the same numbers are written
    expected = reference_deltas(mt, layers, heads, groups, head_dim, scale, canonical)
    assert len(hf) == 2 * len(expected) == 2 * 7 * layers
    for (i, block, proj), delta in expected.items():
        prefix = f"base_model.model.model.layers.{i}.{block}.{proj}"
        got = scale * hf[f"{prefix}.lora_B.weight"] @ hf[f"{prefix}.lora_A.weight"]
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-5)


def test_peft_loads_the_adapter_and_matches_a_hand_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads, groups, head_dim, hidden, ffn, layers, rank, alpha = 4, 2, 16, 64, 128, 2, 4, 8
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=groups, intermediate_size=ffn, max_position_embeddings=64)
    base = Qwen2ForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    mt = megatron_tensors(layers, hidden, heads, groups, head_dim, ffn, rank, canonical=False)
    tensors = megatron_lora_to_hf_peft(mt, num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim)
    cfg = hf_adapter_config(rank=rank, alpha=alpha, dropout=0.0, base_model_name_or_path=str(tmp_path / "base"),
                            target_modules_hf=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    write_hf_peft_adapter(tmp_path / "adapter", tensors, cfg)

    peft_model = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    manual = Qwen2ForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        for (i, block, proj), delta in reference_deltas(mt, layers, heads, groups, head_dim, alpha / rank, False).items():
            getattr(getattr(manual.model.layers[i], block), proj).weight += delta
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, manual(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
    # fp32; random (large) deltas make logits of order 10: only summation order differs, < 1e-4
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name, weight in manual.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], weight, rtol=1e-5, atol=1e-5)


def test_errors_name_the_tensor():
    mt = megatron_tensors(1, 32, 4, 2, 8, 16, 2, canonical=False)
    bad = dict(mt)
    name = "module.decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight"
    bad[name] = torch.zeros(30, 2)
    with pytest.raises(AdapterExportError, match=name.replace(".", r"\.") + ": 30 rows"):
        megatron_lora_to_hf_peft(bad, num_attention_heads=4, num_query_groups=2, head_dim=8)
    with pytest.raises(AdapterExportError, match="weight_magnitude.*DoRA"):
        megatron_lora_to_hf_peft({**mt, "decoder.layers.0.mlp.linear_fc2.adapter.weight_magnitude": torch.ones(3)},
                                 num_attention_heads=4, num_query_groups=2, head_dim=8)
    with pytest.raises(AdapterExportError, match="decoder.layers.0.mlp.router.weight: not a Qwen2 LoRA adapter"):
        megatron_lora_to_hf_peft({"decoder.layers.0.mlp.router.weight": torch.ones(2)}, num_attention_heads=4,
                                 num_query_groups=2, head_dim=8)
    with pytest.raises(AdapterExportError, match="adapter type 'ia3'"):
        megatron_lora_to_hf_peft(mt, num_attention_heads=4, num_query_groups=2, head_dim=8, adapter_type="ia3")
    missing_b = {k: v for k, v in mt.items() if not k.endswith("linear_fc2.adapter.linear_out.weight")}
    with pytest.raises(AdapterExportError, match="down_proj.lora_A.weight: no matching lora_B"):
        megatron_lora_to_hf_peft(missing_b, num_attention_heads=4, num_query_groups=2, head_dim=8)


def test_qwen2_hf_peft_exporter_is_registered_with_nemo():
    model_cls = register_qwen2_hf_peft_exporter()
    key = f"{model_cls}hf-peft"
    assert key in model_cls._EXPORTERS and model_cls._EXPORTERS[key].__name__ == "HFQwen2PEFTExporter"
    # the connector NeMo's export_ckpt would use for a Qwen2 checkpoint
    assert model_cls.exporter("hf-peft", "/nonexistent/ckpt").__class__.__name__ == "HFQwen2PEFTExporter"
