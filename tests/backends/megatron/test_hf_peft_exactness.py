"""NeMo Megatron LoRA -> Hugging Face PEFT export is exact.

The reference for every projection is derived here, independently of the exporter: the delta
NeMo adds to a fused layer's output, pushed through Megatron's own slicing of that output
(get_query_key_value_tensors' view [.., groups, (heads/groups + 2) * head_dim] + split; SwiGLU's
chunk into gate, up). The NeMo tests at the end check that reference against NeMo's real adapter
modules (on a CPU megatron model) and run the registered connector through llm.export_ckpt.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from jp_peft.backends.megatron.hf_peft import (AdapterExportError, adapter_settings, export_adapter, hf_adapter_config,
                                    hf_rank_pattern, hf_target_modules, megatron_lora_to_hf_peft,
                                    write_hf_peft_adapter)

pytestmark = pytest.mark.unit
HF_PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ADAPTER_TYPE = {"LoRA": "lora", "CanonicalLoRA": "canonical_lora"}
# fp32 throughout. Exported values are copies, so HF scale*B@A differs from the reference only by
# matmul summation order (and exact zeros): relative ~1e-7; the tolerances leave margin.
RTOL, ATOL = 1e-5, 1e-6


# --- Megatron-side tensors and the independent reference ------------------------------------

def megatron_adapters(*, layers, hidden, heads, groups, head_dim, ffn, rank, canonical, prefix="module.", seed=0):
    """Random LoRA tensors named as NeMo's model state_dict names them (shapes as NeMo builds them)."""
    g = torch.Generator().manual_seed(seed)
    q, kv = heads * head_dim, groups * head_dim
    shapes = {}
    for i in range(layers):
        p = f"{prefix}decoder.layers.{i}."
        if canonical:
            subs = {"self_attention.linear_qkv.adapter.adapter_q.": (hidden, q),
                    "self_attention.linear_qkv.adapter.adapter_k.": (hidden, kv),
                    "self_attention.linear_qkv.adapter.adapter_v.": (hidden, kv),
                    "mlp.linear_fc1.adapter.adapter_gate.": (hidden, ffn),
                    "mlp.linear_fc1.adapter.adapter_up.": (hidden, ffn)}
        else:
            subs = {"self_attention.linear_qkv.adapter.": (hidden, q + 2 * kv),
                    "mlp.linear_fc1.adapter.": (hidden, 2 * ffn)}
        subs |= {"self_attention.linear_proj.adapter.": (q, hidden), "mlp.linear_fc2.adapter.": (ffn, hidden)}
        for name, (n_in, n_out) in subs.items():
            shapes[p + name + "linear_in.weight"] = (rank, n_in)
            shapes[p + name + "linear_out.weight"] = (n_out, rank)
    return {k: 0.1 * torch.randn(*s, generator=g) for k, s in shapes.items()}


def nemo_fused_deltas(mt, layer, *, scale, canonical, prefix="module."):
    """The weight delta NeMo adds to each Megatron linear of one layer ([out rows, in])."""
    p = f"{prefix}decoder.layers.{layer}."

    def d(name):
        return scale * mt[p + name + "linear_out.weight"] @ mt[p + name + "linear_in.weight"]

    out = {"linear_proj": d("self_attention.linear_proj.adapter."), "linear_fc2": d("mlp.linear_fc2.adapter.")}
    if canonical:
        # NeMo 2.x LoRALinearSplitQKV: cat([q, k, v]) added onto linear_qkv's (interleaved) output;
        # LoRALinearSplitFC1UpGate: cat([gate, up]). Checked against NeMo's modules below.
        out["linear_qkv"] = torch.cat([d(f"self_attention.linear_qkv.adapter.adapter_{x}.") for x in "qkv"])
        out["linear_fc1"] = torch.cat([d(f"mlp.linear_fc1.adapter.adapter_{x}.") for x in ("gate", "up")])
    else:
        out["linear_qkv"] = d("self_attention.linear_qkv.adapter.")
        out["linear_fc1"] = d("mlp.linear_fc1.adapter.")
    return out


def megatron_slices(fused, *, heads, groups, head_dim):
    """HF projection -> delta, by slicing Megatron outputs the way megatron-core does: the
    response to the identity input (one row per input feature) viewed and split as in
    get_query_key_value_tensors (qkv) and SwiGLU (fc1)."""
    per_group = heads // groups
    y = fused["linear_qkv"].t()  # rows: inputs; last dim: linear_qkv's output
    y = y.reshape(y.shape[0], groups, (per_group + 2) * head_dim)
    q, k, v = torch.split(y, [per_group * head_dim, head_dim, head_dim], dim=-1)
    gate, up = torch.chunk(fused["linear_fc1"].t(), 2, dim=-1)
    return {"q_proj": q.reshape(q.shape[0], -1).t(), "k_proj": k.reshape(k.shape[0], -1).t(),
            "v_proj": v.reshape(v.shape[0], -1).t(), "gate_proj": gate.t(), "up_proj": up.t(),
            "o_proj": fused["linear_proj"], "down_proj": fused["linear_fc2"]}


def hf_delta(tensors, layer, proj, scale):
    p = f"base_model.model.model.layers.{layer}.{HF_PROJ[proj]}.{proj}"
    return scale * tensors[p + ".lora_B.weight"] @ tensors[p + ".lora_A.weight"]


# --- exactness of the tensor mapping --------------------------------------------------------

SHAPES = [  # heads, groups, head_dim, ffn: Qwen2.5-0.5B's attention, MHA, 4-way GQA
    pytest.param(14, 2, 64, 96, id="qwen2.5-0.5b-14h-2g"),
    pytest.param(8, 8, 8, 48, id="mha-8h-8g"),
    pytest.param(16, 4, 8, 40, id="gqa-16h-4g"),
]


@pytest.mark.parametrize("heads, groups, head_dim, ffn", SHAPES)
@pytest.mark.parametrize("canonical", [False, True], ids=["lora", "canonical_lora"])
def test_hf_deltas_equal_megatron_deltas(heads, groups, head_dim, ffn, canonical):
    layers, rank, alpha = 2, 4, 8
    hidden = heads * head_dim
    mt = megatron_adapters(layers=layers, hidden=hidden, heads=heads, groups=groups, head_dim=head_dim, ffn=ffn,
                           rank=rank, canonical=canonical)
    hf = megatron_lora_to_hf_peft(mt, num_attention_heads=heads, num_query_groups=groups, head_dim=head_dim,
                                  adapter_type="canonical_lora" if canonical else "lora", rank=rank,
                                  hidden_size=hidden, ffn_hidden_size=ffn)
    scale = alpha / rank  # NeMo: alpha/dim; PEFT: lora_alpha/r -- the config writes the same numbers
    assert len(hf) == 2 * 7 * layers
    for layer in range(layers):
        expected = megatron_slices(nemo_fused_deltas(mt, layer, scale=scale, canonical=canonical),
                                   heads=heads, groups=groups, head_dim=head_dim)
        for proj, delta in expected.items():
            torch.testing.assert_close(hf_delta(hf, layer, proj, scale), delta, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"layer {layer} {proj}: {m}")
    pattern = hf_rank_pattern(hf, rank)
    if canonical:
        # NeMo 2.x CanonicalLoRA's q/k/v rows come from two or three of adapter_q/k/v (groups > 1),
        # so their exact PEFT adapters stack those A blocks: rank 2r or 3r, declared in rank_pattern
        assert set(pattern) == {"q_proj", "k_proj", "v_proj"} and set(pattern.values()) <= {2 * rank, 3 * rank}
    else:
        assert pattern == {}
        # fused A is shared: each projection of a fused layer gets an identical copy
        a = [hf[f"base_model.model.model.layers.0.self_attn.{p}.lora_A.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])


def test_canonical_interleaved_layout_is_one_to_one():
    """For a split-QKV wrapper that interleaves q/k/v per group, adapter_q/k/v are q/k/v_proj's."""
    mt = megatron_adapters(layers=1, hidden=64, heads=4, groups=2, head_dim=16, ffn=32, rank=2, canonical=True)
    hf = megatron_lora_to_hf_peft(mt, num_attention_heads=4, num_query_groups=2, head_dim=16,
                                  adapter_type="canonical_lora", canonical_qkv_layout="interleaved")
    for x, proj in zip("qkv", ("q_proj", "k_proj", "v_proj")):
        for ab, lora in (("linear_in", "lora_A"), ("linear_out", "lora_B")):
            src = mt[f"module.decoder.layers.0.self_attention.linear_qkv.adapter.adapter_{x}.{ab}.weight"]
            assert torch.equal(hf[f"base_model.model.model.layers.0.self_attn.{proj}.{lora}.weight"], src)


def test_prefixes_extra_state_and_dtype_are_handled():
    """module./model. wrappers are stripped, megatron's empty _extra_state entries skipped, and
    values copied bit for bit in their own dtype."""
    mt = megatron_adapters(layers=1, hidden=32, heads=4, groups=2, head_dim=8, ffn=16, rank=2, canonical=False,
                           prefix="module.module.")
    mt = {k: v.to(torch.bfloat16) for k, v in mt.items()}
    mt["module.module.decoder.layers.0.mlp.linear_fc2.adapter.linear_in._extra_state"] = None
    hf = megatron_lora_to_hf_peft(mt, num_attention_heads=4, num_query_groups=2, head_dim=8)
    assert all(t.dtype == torch.bfloat16 for t in hf.values())
    src = mt["module.module.decoder.layers.0.mlp.linear_fc2.adapter.linear_out.weight"]
    assert torch.equal(hf["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"], src)


def test_target_modules_cover_exactly_the_exported_modules():
    mt = megatron_adapters(layers=2, hidden=32, heads=4, groups=2, head_dim=8, ffn=16, rank=2, canonical=False)
    hf = megatron_lora_to_hf_peft(mt, num_attention_heads=4, num_query_groups=2, head_dim=8)
    assert hf_target_modules(hf, 2) == sorted(HF_PROJ)
    # adapters on layer 0 only (NeMo wildcard targets): full module paths, not every layer
    only0 = {k: v for k, v in hf.items() if ".layers.0." in k}
    assert hf_target_modules(only0, 2) == sorted(f"model.layers.0.{b}.{p}" for p, b in HF_PROJ.items())


# --- PEFT loads it: merged weights and logits -----------------------------------------------

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(path)
    return path


def load_tiny(path):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def check_peft_matches(tiny_qwen2, adapter_dir, expected_by_layer):
    """PeftModel on the tiny base == base + expected deltas: merged weights and logits."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_tiny(tiny_qwen2), str(adapter_dir)).eval()
    manual = load_tiny(tiny_qwen2)
    with torch.no_grad():
        for layer, deltas in expected_by_layer.items():
            for proj, delta in deltas.items():
                getattr(getattr(manual.model.layers[layer], HF_PROJ[proj]), proj).weight += delta
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_peft, logits_manual = peft_model(input_ids=ids).logits, manual(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
    # fp32: only summation order differs between the adapter's x@A^T@B^T and the merged weight
    torch.testing.assert_close(logits_peft, logits_manual, rtol=0, atol=1e-5)
    merged_sd = merged.state_dict()
    for name, weight in manual.state_dict().items():
        torch.testing.assert_close(merged_sd[name], weight, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("canonical", [False, True], ids=["lora", "canonical_lora"])
def test_peft_loads_the_adapter_and_matches_megatron(tiny_qwen2, tmp_path, canonical):
    heads, groups, hidden, ffn, layers = 4, 2, 64, 128, 2
    head_dim, rank, alpha = hidden // heads, 4, 8
    mt = megatron_adapters(layers=layers, hidden=hidden, heads=heads, groups=groups, head_dim=head_dim, ffn=ffn,
                           rank=rank, canonical=canonical)
    out = export_adapter(mt, tmp_path / "adapter", peft_class="CanonicalLoRA" if canonical else "LoRA", dim=rank,
                         alpha=alpha, dropout=0.05, dropout_position="pre", num_attention_heads=heads,
                         num_query_groups=groups, head_dim=head_dim, num_layers=layers, hidden_size=hidden,
                         ffn_hidden_size=ffn, base_model_name_or_path=str(tiny_qwen2))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (rank, alpha, 0.05)
    assert config["target_modules"] == sorted(HF_PROJ)
    expected = {i: megatron_slices(nemo_fused_deltas(mt, i, scale=alpha / rank, canonical=canonical),
                                   heads=heads, groups=groups, head_dim=head_dim) for i in range(layers)}
    check_peft_matches(tiny_qwen2, out, expected)


# --- what cannot be exported exactly is refused, naming the tensor or setting --------------

SMALL = dict(num_attention_heads=4, num_query_groups=2, head_dim=8)


def small(canonical=False):
    return megatron_adapters(layers=1, hidden=32, heads=4, groups=2, head_dim=8, ffn=16, rank=2, canonical=canonical)


def test_unsupported_adapter_types_and_settings():
    with pytest.raises(AdapterExportError, match="adapter type 'ia3'"):
        megatron_lora_to_hf_peft(small(), adapter_type="ia3", **SMALL)
    with pytest.raises(AdapterExportError, match="IA3: unknown adapter type"):
        adapter_settings("IA3", dim=8, alpha=16, dropout=0.0, dropout_position="pre")
    with pytest.raises(AdapterExportError, match="DoRA"):
        adapter_settings("DoRA", dim=8, alpha=16, dropout=0.0, dropout_position="pre")
    with pytest.raises(AdapterExportError, match="dropout_position='post'"):
        adapter_settings("LoRA", dim=8, alpha=16, dropout=0.1, dropout_position="post")
    # without dropout the position changes nothing, so it is exact and allowed (as in NeMo's Llama exporter)
    assert adapter_settings("LoRA", dim=8, alpha=None, dropout=0.0, dropout_position="post")["alpha"] == 8
    assert adapter_settings("CanonicalLoRA", dim=8, alpha=16, dropout=0.1,
                            dropout_position="pre")["adapter_type"] == "canonical_lora"


def test_dora_tensors_are_refused():
    name = "module.decoder.layers.0.mlp.linear_fc2.adapter.weight_magnitude"
    with pytest.raises(AdapterExportError, match=rf"{name}: a DoRA magnitude"):
        megatron_lora_to_hf_peft({**small(), name: torch.ones(32)}, **SMALL)


def test_wrong_shapes_name_the_tensor():
    name = "module.decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight"
    with pytest.raises(AdapterExportError, match=rf"{name}: 30 rows, expected 64 \(4 heads, 2 query groups"):
        megatron_lora_to_hf_peft({**small(), name: torch.zeros(30, 2)}, **SMALL)
    a_name = "module.decoder.layers.0.mlp.linear_fc2.adapter.linear_in.weight"
    with pytest.raises(AdapterExportError, match=r"adapter\.linear_in\.weight: rank 2, but NeMo scales by alpha/dim"):
        megatron_lora_to_hf_peft(small(), rank=4, **SMALL)
    with pytest.raises(AdapterExportError, match=r"linear_fc2.adapter.linear_out.weight: rank 3 != rank 2"):
        megatron_lora_to_hf_peft({**small(), a_name.replace("linear_in", "linear_out"): torch.zeros(32, 3)}, **SMALL)
    with pytest.raises(AdapterExportError, match=r"fc1\.adapter\.linear_out\.weight: 32 rows, expected 48 \(ffn 24\)"):
        megatron_lora_to_hf_peft(small(), ffn_hidden_size=24, **SMALL)
    with pytest.raises(AdapterExportError, match=r"linear_qkv\.adapter\.linear_in\.weight: 32 columns, expected 40"):
        megatron_lora_to_hf_peft(small(), hidden_size=40, **SMALL)


def test_unknown_or_mismatched_names_are_refused():
    for name in ("module.decoder.layers.0.mlp.router.weight",
                 "decoder.layers.0.mlp.linear_qkv.adapter.linear_in.weight",
                 "module.decoder.layers.0.self_attention.linear_proj.adapter.linear_in.bias"):
        with pytest.raises(AdapterExportError, match=rf"{name}: not a Qwen2 LoRA adapter tensor"):
            megatron_lora_to_hf_peft({**small(), name: torch.ones(2, 2)}, **SMALL)
    fused = "module.decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight"
    with pytest.raises(AdapterExportError, match=rf"{fused}: not a tensor of a NeMo canonical_lora adapter"):
        megatron_lora_to_hf_peft({**small(canonical=True), fused: torch.ones(2, 32)}, adapter_type="canonical_lora",
                                 **SMALL)
    with pytest.raises(AdapterExportError, match="adapter_q.linear_in.weight: not a tensor of a NeMo lora adapter"):
        megatron_lora_to_hf_peft(small(canonical=True), adapter_type="lora", **SMALL)
    missing_b = {k: v for k, v in small().items() if not k.endswith("linear_fc2.adapter.linear_out.weight")}
    with pytest.raises(AdapterExportError, match="linear_fc2.adapter.linear_in.weight: its adapter has no linear_out"):
        megatron_lora_to_hf_peft(missing_b, **SMALL)
    no_k = {k: v for k, v in small(canonical=True).items() if ".adapter_k." not in k}
    with pytest.raises(AdapterExportError, match="needs adapter_q, adapter_k and adapter_v"):
        megatron_lora_to_hf_peft(no_k, adapter_type="canonical_lora", **SMALL)
    with pytest.raises(AdapterExportError, match="target_modules_hf"):
        hf_adapter_config(rank=2, alpha=4, dropout=0.0, target_modules_hf=["lm_head"], base_model_name_or_path="x")


def test_write_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    hf = megatron_lora_to_hf_peft(small(), **SMALL)
    config = hf_adapter_config(rank=2, alpha=4, dropout=0.0, target_modules_hf=sorted(HF_PROJ),
                               base_model_name_or_path="b")
    out = write_hf_peft_adapter(tmp_path / "adapter", hf, config)
    before = (out / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_hf_peft_adapter(out, hf, config)
    assert (out / "adapter_model.safetensors").read_bytes() == before  # the previous export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no half export left beside it
    monkeypatch.undo()
    write_hf_peft_adapter(out, hf, config)  # replacing an existing export works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# --- NeMo: registration, NeMo's own adapter modules, llm.export_ckpt ------------------------

def test_importing_the_exporter_does_not_import_nemo():
    code = "import sys, jp_peft.backends.megatron.hf_peft; sys.exit('nemo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_qwen2_hf_peft_exporter_is_registered_with_nemo():
    from nemo.collections.llm.gpt.model.qwen2 import Qwen2Model
    from nemo.lightning import io

    from jp_peft.backends.megatron.hf_peft import register_qwen2_hf_peft_exporter

    connector_cls = register_qwen2_hf_peft_exporter()
    assert register_qwen2_hf_peft_exporter() is connector_cls  # idempotent
    assert Qwen2Model._EXPORTERS[f"{Qwen2Model}hf-peft"] is connector_cls  # io.model_exporter's key
    assert issubclass(connector_cls, io.ModelConnector)
    connector = Qwen2Model.exporter("hf-peft", "/nonexistent/ckpt")  # what llm.export_ckpt resolves
    assert isinstance(connector, connector_cls) and str(connector) == "/nonexistent/ckpt"


@pytest.fixture(scope="module")
def megatron_cpu():
    """A one-process gloo group and megatron parallel state, so NeMo's adapter modules build on CPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


def nemo_lora_model(peft, monkeypatch, *, heads, groups, seed):
    """A tiny Qwen2-shaped megatron GPT (local layer spec, CPU) with NeMo's own PEFT transform
    applied, wrapped so its state_dict names start with "module." as in NeMo's Lightning model."""
    import nemo.collections.llm.peft.lora as nemo_lora
    import nemo.collections.llm.peft.utils as nemo_peft_utils
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.collections.llm import fn

    # Without Transformer Engine, megatron stubs TE's classes with MagicMocks and NeMo's peft utils
    # then believe TE is there; these two patches put NeMo on its plain-megatron code path.
    monkeypatch.setattr(nemo_peft_utils, "HAVE_TE", False)
    monkeypatch.setattr(nemo_lora, "te", type("NoTE", (), {"Linear": type("NoTELinear", (), {})}))
    config = TransformerConfig(num_layers=TINY["num_hidden_layers"], hidden_size=TINY["hidden_size"],
                               num_attention_heads=heads, num_query_groups=groups,
                               ffn_hidden_size=TINY["intermediate_size"], gated_linear_unit=True,
                               activation_func=torch.nn.functional.silu, add_qkv_bias=True, add_bias_linear=False,
                               normalization="RMSNorm", use_cpu_initialization=True)
    gpt = fn.walk(GPTModel(config, get_gpt_layer_local_spec(), vocab_size=TINY["vocab_size"], max_sequence_length=64),
                  peft.transform)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if ".adapter." in name:  # NeMo initialises B to zero: give every adapter a real delta
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    wrapper = torch.nn.Module()
    wrapper.module = gpt
    return wrapper, config


@torch.no_grad()
def nemo_module_deltas(gpt, layer):
    """Each wrapped linear's output minus its base linear's output, on identity inputs: the weight
    delta NeMo's real adapter modules add ([out rows, in])."""
    out = {}
    for path in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
        wrapped = gpt.decoder.layers[layer].get_submodule(path)
        n_in = wrapped.to_wrap.input_size
        x = torch.eye(n_in).reshape(n_in, 1, n_in)  # [sequence, batch, features]
        out[path.split(".")[1]] = (wrapped(x)[0] - wrapped.to_wrap(x)[0])[:, 0, :].t()
    return out


@pytest.mark.parametrize("heads, groups", [(4, 2), (8, 8), (8, 4)])
@pytest.mark.parametrize("peft_class", ["LoRA", "CanonicalLoRA"])
def test_reference_matches_nemo_adapter_modules(megatron_cpu, monkeypatch, peft_class, heads, groups):
    """The reference above (NeMo's delta layout) is what NeMo's own modules compute, and the
    export reproduces it: exported HF deltas == NeMo module deltas sliced the Megatron way."""
    from nemo.collections.llm import peft as nemo_peft

    rank, alpha = 4, 8
    peft = getattr(nemo_peft, peft_class)(dim=rank, alpha=alpha)
    wrapper, config = nemo_lora_model(peft, monkeypatch, heads=heads, groups=groups, seed=heads + groups)
    sd = {k: v for k, v in wrapper.state_dict().items() if ".adapter." in k}
    assert any(k.endswith("._extra_state") for k in sd)  # as the connector sees them; skipped by the mapping
    hf = megatron_lora_to_hf_peft(sd, num_attention_heads=heads, num_query_groups=groups, head_dim=config.kv_channels,
                                  adapter_type=ADAPTER_TYPE[peft_class], rank=rank, hidden_size=config.hidden_size,
                                  ffn_hidden_size=config.ffn_hidden_size)
    for layer in range(config.num_layers):
        actual = nemo_module_deltas(wrapper.module, layer)
        reference = nemo_fused_deltas(sd, layer, scale=alpha / rank, canonical=peft_class == "CanonicalLoRA")
        for linear in actual:
            torch.testing.assert_close(actual[linear], reference[linear], rtol=RTOL, atol=ATOL)
        expected = megatron_slices(actual, heads=heads, groups=groups, head_dim=config.kv_channels)
        for proj, delta in expected.items():
            torch.testing.assert_close(hf_delta(hf, layer, proj, alpha / rank), delta, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"layer {layer} {proj}: {m}")


def test_nemo_canonical_lora_cannot_run_a_partial_group(megatron_cpu, monkeypatch):
    """Why lora_mapping refuses e.g. [q_proj, v_proj] for the megatron backend: NeMo 2.7.3's split
    QKV wrapper calls adapter_k even when it was not targeted. If this starts passing forward,
    NeMo fixed it and the mapping may allow CanonicalLoRA partial groups again."""
    from nemo.collections.llm import peft as nemo_peft

    from jp_peft.backends.megatron.lora_mapping import LoraMappingError, to_nemo_targets

    peft = nemo_peft.CanonicalLoRA(target_modules=["linear_q", "linear_v"], dim=2, alpha=4)
    wrapper, config = nemo_lora_model(peft, monkeypatch, heads=4, groups=2, seed=1)
    qkv = wrapper.module.decoder.layers[0].self_attention.linear_qkv
    assert qkv.adapter.adapter_k is None and qkv.adapter.adapter_q is not None
    with pytest.raises(TypeError, match="'NoneType' object is not callable"):
        qkv(torch.zeros(3, 1, config.hidden_size))
    with pytest.raises(LoraMappingError, match="splits the fused group"):
        to_nemo_targets(("q_proj", "v_proj"))


@pytest.mark.parametrize("peft_class", ["LoRA", "CanonicalLoRA"])
def test_export_ckpt_through_the_registered_connector(megatron_cpu, monkeypatch, tmp_path, tiny_qwen2, peft_class):
    """llm.export_ckpt(target="hf-peft") on a Qwen2 PEFT checkpoint, with NeMo's checkpoint loading
    (of CUDA-trained checkpoints) replaced by the CPU model above; PEFT reproduces NeMo's deltas."""
    from types import SimpleNamespace

    import nemo.lightning.io as nemo_io
    from nemo.collections import llm
    from nemo.collections.llm import peft as nemo_peft
    from nemo.collections.llm.gpt.model.qwen2 import Qwen2Model

    from jp_peft.backends.megatron.hf_peft import register_qwen2_hf_peft_exporter

    rank, alpha, heads, groups = 4, 8, TINY["num_attention_heads"], TINY["num_key_value_heads"]
    peft = getattr(nemo_peft, peft_class)(dim=rank, alpha=alpha)
    wrapper, config = nemo_lora_model(peft, monkeypatch, heads=heads, groups=groups, seed=7)
    ckpt = tmp_path / "ckpt"
    (ckpt / "weights").mkdir(parents=True)
    (ckpt / "weights" / "adapter_metadata.json").write_text(
        json.dumps({"model_ckpt_path": "/nemo_home/models/Qwen/Qwen2.5-0.5B"}))

    connector_cls = register_qwen2_hf_peft_exporter()
    loaded = []
    monkeypatch.setattr(nemo_io, "load_context", lambda path, subpath=None: peft)
    monkeypatch.setattr(connector_cls, "nemo_load", lambda self, path, trainer=None, cpu=True: (
        loaded.append(path) or (SimpleNamespace(config=config, state_dict=wrapper.state_dict), None)))
    out = llm.export_ckpt(path=ckpt, target="hf-peft", output_path=tmp_path / "hf_adapter",
                          load_connector=lambda path, target: Qwen2Model.exporter(target, path))
    assert loaded == [str(ckpt)] and out == tmp_path / "hf_adapter"
    config_json = json.loads((out / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B"  # NeMo's guess from adapter metadata
    # What export_stage passes: the configured base (export_ckpt forwards keyword arguments to apply()).
    local = llm.export_ckpt(path=ckpt, target="hf-peft", output_path=tmp_path / "hf_adapter_local",
                            load_connector=lambda path, target: Qwen2Model.exporter(target, path),
                            base_model_name_or_path=str(tiny_qwen2))
    assert json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_qwen2)
    expected = {i: megatron_slices(nemo_module_deltas(wrapper.module, i), heads=heads, groups=groups,
                                   head_dim=config.kv_channels) for i in range(config.num_layers)}
    check_peft_matches(tiny_qwen2, out, expected)


def test_connector_refuses_dora_before_loading_the_checkpoint(monkeypatch, tmp_path):
    import nemo.lightning.io as nemo_io
    from nemo.collections import llm
    from nemo.collections.llm import peft as nemo_peft
    from nemo.collections.llm.gpt.model.qwen2 import Qwen2Model

    from jp_peft.backends.megatron.hf_peft import register_qwen2_hf_peft_exporter

    connector_cls = register_qwen2_hf_peft_exporter()
    monkeypatch.setattr(nemo_io, "load_context", lambda path, subpath=None: nemo_peft.DoRA(dim=4, alpha=8))
    monkeypatch.setattr(connector_cls, "nemo_load", lambda *a, **k: pytest.fail("loaded a DoRA checkpoint"))
    with pytest.raises(AdapterExportError, match="DoRA"):
        llm.export_ckpt(path=tmp_path / "ckpt", target="hf-peft", output_path=tmp_path / "out",
                        load_connector=lambda path, target: Qwen2Model.exporter(target, path))
    assert not (tmp_path / "out").exists()


# --- lora_embed: the trained embedding and output layer as PEFT modules_to_save ----------------

def test_saved_modules_are_copied_without_vocab_padding_and_a_missing_one_is_refused():
    from jp_peft.backends.megatron.hf_peft import saved_modules_to_hf

    g = torch.Generator().manual_seed(1)
    embed, head = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)  # 8 rows: 6 tokens + 2 padding
    state = {"module.embedding.word_embeddings.weight": embed, "module.output_layer.weight": head,
             "module.decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(2, 2)}
    out = saved_modules_to_hf(state, vocab_size=6)
    assert sorted(out) == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    assert torch.equal(out["base_model.model.model.embed_tokens.weight"], embed[:6])
    assert torch.equal(out["base_model.model.lm_head.weight"], head[:6])
    del state["module.output_layer.weight"]
    with pytest.raises(AdapterExportError, match="lm_head"):
        saved_modules_to_hf(state, vocab_size=6)
    with pytest.raises(AdapterExportError, match="fewer than the vocabulary"):
        saved_modules_to_hf({"embedding.word_embeddings.weight": embed, "output_layer.weight": head}, vocab_size=9)


def test_peft_loads_saved_modules_apart_from_a_tied_base(tmp_path):
    """The NeMo side trains embedding and output layer apart (its importer unties them): an adapter with
    both as modules_to_save reproduces that on a base whose config ties them (as Qwen2.5-0.5B's does)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from jp_peft.backends.megatron.hf_peft import saved_modules_to_hf

    tiny_qwen2 = tmp_path / "tied"
    Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)).save_pretrained(tiny_qwen2)
    heads, groups, hidden, ffn, layers, rank = 4, 2, 64, 128, 2, 4
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(2)
    embed, head = torch.randn(vocab, hidden, generator=g) * 0.02, torch.randn(vocab, hidden, generator=g) * 0.02
    mt = megatron_adapters(layers=layers, hidden=hidden, heads=heads, groups=groups, head_dim=hidden // heads, ffn=ffn,
                           rank=rank, canonical=False)
    saved = saved_modules_to_hf({"module.embedding.word_embeddings.weight": embed, "module.output_layer.weight": head},
                                vocab)
    out = export_adapter(mt, tmp_path / "adapter", peft_class="LoRAWithEmbeddings", dim=rank, alpha=8, dropout=0.0,
                         dropout_position="pre", num_attention_heads=heads, num_query_groups=groups,
                         head_dim=hidden // heads, num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                         base_model_name_or_path=str(tiny_qwen2), saved_modules=saved)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "lm_head"]
    model = PeftModel.from_pretrained(base, out).merge_and_unload()
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert torch.equal(model.get_output_embeddings().weight, head)
