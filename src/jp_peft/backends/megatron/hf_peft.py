"""NeMo Megatron LoRA adapters of Qwen2 -> a Hugging Face PEFT adapter, exactly.

Megatron fuses q/k/v into `linear_qkv`, whose output rows are interleaved per query group: for
each group g, the q heads of g, then k_g, then v_g (megatron.core attention's
get_query_key_value_tensors). It fuses gate and up into `linear_fc1`: gate rows, then up rows
(its SwiGLU chunks the output in two and applies the activation to the first half).

NeMo's fused `LoRA` puts one adapter on each fused layer: its A is shared by the fused projections
(copied to each) and its B is split exactly as Megatron splits the fused output. `CanonicalLoRA`
has one adapter per projection, but NeMo 2.x's LoRALinearSplitQKV adds [dq; dk; dv] (all q heads,
then k, then v) onto the *interleaved* linear_qkv output, so with more than one query group
adapter_q is not q_proj's adapter. What that model computes is still an exact low-rank update of
each HF projection, with two or three of the A blocks stacked (rank 2r or 3r instead of r); it is
written that way, with PEFT's rank_pattern/alpha_pattern keeping the scale alpha/r.

Nothing is computed from the weights: every exported value is a copy of a NeMo value or a
structural zero, so the export is bit-exact in the checkpoint's own dtype. Anything the mapping
cannot express raises AdapterExportError naming the tensor or setting.

Only torch is imported at import time; NeMo (~20 s to import) only in register_qwen2_hf_peft_exporter().
Just over 400 lines: the fused layouts, their inverse and the exporter that applies them are one mapping,
tested as one (tests/backends/megatron/test_hf_peft_exactness.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

HF_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# NeMo class -> adapter_type; the *WithEmbeddings ones (backends/megatron/methods.py, method lora_embed) also
# trained the embeddings and output layer, which export as PEFT modules_to_save
ADAPTER_TYPES = {"LoRA": "lora", "CanonicalLoRA": "canonical_lora", "LoRAWithEmbeddings": "lora",
                 "CanonicalLoRAWithEmbeddings": "canonical_lora"}
# Megatron's embedding / output layer -> the PEFT adapter tensor of that module in modules_to_save
# (PEFT's own names: base_model.model.<module path>.weight, as PeftModel.save_pretrained writes them)
SAVED_MODULES = {"embedding.word_embeddings.weight": ("embed_tokens", "base_model.model.model.embed_tokens.weight"),
                 "output_layer.weight": ("lm_head", "base_model.model.lm_head.weight")}
CANONICAL_QKV_LAYOUTS = ("concatenated", "interleaved")

# A NeMo adapter tensor as the model's state_dict() names it, after any "module."/"model." wrapper
# prefixes (Lightning module, DDP, Float16Module), e.g.
#   decoder.layers.3.self_attention.linear_qkv.adapter.linear_in.weight            (LoRA)
#   decoder.layers.3.self_attention.linear_qkv.adapter.adapter_q.linear_out.weight  (CanonicalLoRA)
_NEMO_NAME = re.compile(
    r"^(?:(?:module|model)\.)*decoder\.layers\.(?P<layer>\d+)\.(?P<block>self_attention|mlp)\."
    r"(?P<linear>linear_qkv|linear_proj|linear_fc1|linear_fc2)\.adapter\.(?:(?P<sub>adapter_[a-z]+)\.)?"
    r"(?P<ab>linear_in|linear_out)\.(?P<param>weight|_extra_state)$")
_HF_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# (linear, sub-adapter) -> HF projection, where one NeMo adapter is exactly one PEFT adapter.
_ONE_TO_ONE = {("linear_proj", None): "o_proj", ("linear_fc2", None): "down_proj",
               ("linear_fc1", "adapter_gate"): "gate_proj", ("linear_fc1", "adapter_up"): "up_proj",
               ("linear_qkv", "adapter_q"): "q_proj", ("linear_qkv", "adapter_k"): "k_proj",
               ("linear_qkv", "adapter_v"): "v_proj"}
_ALLOWED_SUBS = {"lora": {None}, "canonical_lora": {None, "adapter_q", "adapter_k", "adapter_v",
                                                    "adapter_gate", "adapter_up"}}
_FUSED = {("linear_qkv", None), ("linear_fc1", None)}  # never under CanonicalLoRA


class AdapterExportError(ValueError):
    """The adapter cannot be written as an exact PEFT adapter; the message names the tensor or setting."""


def adapter_settings(peft_class: str, *, dim: int, alpha, dropout: float, dropout_position: str) -> dict:
    """A NeMo PEFT object's class name and settings -> {adapter_type, rank, alpha, dropout}."""
    if peft_class == "DoRA":
        raise AdapterExportError("DoRA: NeMo's weight-decomposed adapter is not exported (only LoRA/CanonicalLoRA)")
    if peft_class not in ADAPTER_TYPES:
        raise AdapterExportError(f"{peft_class}: unknown adapter type; only {sorted(ADAPTER_TYPES)} export exactly")
    if not isinstance(dim, int) or dim <= 0:
        raise AdapterExportError(f"{peft_class}.dim={dim!r}: the rank must be a positive integer")
    alpha = dim if alpha is None else alpha  # ParallelLinearAdapter's own default
    if alpha <= 0:
        raise AdapterExportError(f"{peft_class}.alpha={alpha!r}: the scale alpha/dim must be positive")
    # PEFT applies lora_dropout to the adapter's input ("pre"); with no dropout the position is moot.
    if dropout and dropout_position != "pre":
        raise AdapterExportError(f"{peft_class}.dropout_position={dropout_position!r} with dropout={dropout}: "
                                 "PEFT only drops the adapter's input ('pre')")
    return {"adapter_type": ADAPTER_TYPES[peft_class], "rank": dim, "alpha": alpha, "dropout": float(dropout)}


def _megatron_qkv_split(rows: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Rows of linear_qkv's output ([groups, heads/groups + 2, head_dim] interleaved) -> q, k, v rows."""
    per_group, tail = heads // groups, rows.shape[1:]
    grouped = rows.reshape(groups, per_group + 2, head_dim, *tail)
    return (grouped[:, :per_group].reshape(heads * head_dim, *tail),
            grouped[:, per_group].reshape(groups * head_dim, *tail),
            grouped[:, per_group + 1].reshape(groups * head_dim, *tail))


def _own(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage (copies of A, slices of B): give each its own.
    return t.detach().clone().contiguous()


def _parse(state_dict: dict, adapter_type: str) -> dict:
    """NeMo names -> {(layer, linear, sub): {"linear_in": (name, A), "linear_out": (name, B)}}."""
    adapters: dict = {}
    for name, value in state_dict.items():
        if "weight_magnitude" in name:
            raise AdapterExportError(f"{name}: a DoRA magnitude vector; DoRA is not exported")
        m = _NEMO_NAME.match(name)
        if m is None or (m["block"] == "mlp") != m["linear"].startswith("linear_fc"):
            raise AdapterExportError(f"{name}: not a Qwen2 LoRA adapter tensor this exporter knows")
        if m["param"] == "_extra_state":
            continue  # megatron linears' (empty) Transformer Engine extra state: no weights
        key = (int(m["layer"]), m["linear"], m["sub"])
        if m["sub"] not in _ALLOWED_SUBS[adapter_type] or (adapter_type == "canonical_lora" and key[1:] in _FUSED):
            raise AdapterExportError(f"{name}: not a tensor of a NeMo {adapter_type} adapter")
        if m["sub"] is not None and key[1:] not in _ONE_TO_ONE:
            raise AdapterExportError(f"{name}: {m['sub']} does not belong to {m['linear']}")
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise AdapterExportError(f"{name}: expected a 2-D tensor, got {getattr(value, 'shape', type(value))}")
        adapters.setdefault(key, {})[m["ab"]] = (name, value)
    for parts in adapters.values():
        if len(parts) != 2:
            ((ab, (name, _)),) = parts.items()
            raise AdapterExportError(f"{name}: its adapter has no {'linear_out' if ab == 'linear_in' else 'linear_in'}")
    return adapters


def _check_shapes(key, parts, *, rank, heads, groups, head_dim, hidden_size, ffn_hidden_size):
    """Rank and in/out sizes of one adapter against what Qwen2's Megatron layers take and give."""
    (a_name, a), (b_name, b) = parts["linear_in"], parts["linear_out"]
    if b.shape[1] != a.shape[0]:
        raise AdapterExportError(f"{b_name}: rank {b.shape[1]} != rank {a.shape[0]} of {a_name}")
    if rank is not None and a.shape[0] != rank:
        raise AdapterExportError(f"{a_name}: rank {a.shape[0]}, but NeMo scales by alpha/dim with dim={rank}; "
                                 "PEFT's alpha/r would differ")
    q, kv, ffn = heads * head_dim, groups * head_dim, ffn_hidden_size
    _, linear, sub = key
    # None: a size the caller did not give, so not checked
    out_rows = {("linear_qkv", None): q + 2 * kv, ("linear_qkv", "adapter_q"): q, ("linear_qkv", "adapter_k"): kv,
                ("linear_qkv", "adapter_v"): kv, ("linear_proj", None): hidden_size,
                ("linear_fc1", None): ffn and 2 * ffn, ("linear_fc1", "adapter_gate"): ffn,
                ("linear_fc1", "adapter_up"): ffn, ("linear_fc2", None): hidden_size}[(linear, sub)]
    in_cols = {"linear_qkv": hidden_size, "linear_proj": q, "linear_fc1": hidden_size, "linear_fc2": ffn}[linear]
    why = {"linear_qkv": f"{heads} heads, {groups} query groups, head_dim {head_dim}", "linear_fc1": f"ffn {ffn}",
           "linear_proj": f"hidden {hidden_size}", "linear_fc2": f"hidden {hidden_size}"}[linear]
    if out_rows is not None and b.shape[0] != out_rows:
        raise AdapterExportError(f"{b_name}: {b.shape[0]} rows, expected {out_rows} ({why})")
    if linear == "linear_fc1" and sub is None and b.shape[0] % 2:
        raise AdapterExportError(f"{b_name}: {b.shape[0]} rows cannot split into gate and up halves")
    if in_cols is not None and a.shape[1] != in_cols:
        raise AdapterExportError(f"{a_name}: {a.shape[1]} columns, expected {in_cols}")


def _canonical_qkv(trio, heads, groups, head_dim) -> dict:
    """What NeMo 2.x's LoRALinearSplitQKV adds to the interleaved linear_qkv output -- rows
    [dq; dk; dv] = blockdiag(Bq, Bk, Bv) @ [Aq; Ak; Av] -- as one exact LoRA per HF projection:
    the projection's rows of the block-diagonal B, keeping only the column blocks (and A blocks)
    those rows use."""
    a_blocks = [parts["linear_in"][1] for parts in trio]
    b_blocks = [parts["linear_out"][1] for parts in trio]
    r = a_blocks[0].shape[0]
    if any(a.shape[0] != r for a in a_blocks):
        raise AdapterExportError(f"{trio[0]['linear_in'][0]}: adapter_q/k/v ranks differ")
    b = torch.block_diag(*b_blocks)
    source = torch.cat([torch.full((bb.shape[0],), i) for i, bb in enumerate(b_blocks)])  # row -> its q/k/v block
    out = {}
    for proj, rows, src in zip(("q_proj", "k_proj", "v_proj"), _megatron_qkv_split(b, heads, groups, head_dim),
                               _megatron_qkv_split(source, heads, groups, head_dim)):
        used = sorted(set(src.tolist()))
        cols = torch.cat([torch.arange(i * r, (i + 1) * r) for i in used])
        out[proj] = (torch.cat([a_blocks[i] for i in used]), rows[:, cols])
    return out


def megatron_lora_to_hf_peft(state_dict: dict[str, torch.Tensor], *, num_attention_heads: int,
                             num_query_groups: int, head_dim: int, adapter_type: str = "lora",
                             rank: int | None = None, hidden_size: int | None = None,
                             ffn_hidden_size: int | None = None,
                             canonical_qkv_layout: str = "concatenated") -> dict[str, torch.Tensor]:
    """NeMo adapter tensors (names as in the model's state_dict) -> PEFT adapter_model tensors.

    rank/hidden_size/ffn_hidden_size, when given, are checked against every tensor.
    canonical_qkv_layout says how CanonicalLoRA's q/k/v outputs meet linear_qkv: "concatenated"
    (NeMo 2.x, see the module docstring) or "interleaved" (a wrapper that interleaves them per
    group, which makes adapter_q/k/v exactly q/k/v_proj's adapters).
    """
    if adapter_type not in _ALLOWED_SUBS:
        raise AdapterExportError(f"adapter type {adapter_type!r}: only 'lora' and 'canonical_lora' export exactly")
    if canonical_qkv_layout not in CANONICAL_QKV_LAYOUTS:
        raise AdapterExportError(f"canonical_qkv_layout {canonical_qkv_layout!r}: one of {CANONICAL_QKV_LAYOUTS}")
    if num_query_groups <= 0 or num_attention_heads % num_query_groups:
        raise AdapterExportError(f"{num_attention_heads} heads do not split into {num_query_groups} query groups")
    heads, groups = num_attention_heads, num_query_groups
    adapters = _parse(state_dict, adapter_type)
    if not adapters:
        raise AdapterExportError("no LoRA adapter tensors in the state dict")
    for key, parts in adapters.items():
        _check_shapes(key, parts, rank=rank, heads=heads, groups=groups, head_dim=head_dim,
                      hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size)

    out: dict[str, torch.Tensor] = {}

    def put(layer, block, proj, a, b):
        prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = _own(a), _own(b)

    for (layer, linear, sub), parts in sorted(adapters.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "")):
        block = "mlp" if linear.startswith("linear_fc") else "self_attn"
        a, b = parts["linear_in"][1], parts["linear_out"][1]
        if (linear, sub) == ("linear_qkv", None):  # fused LoRA: shared A, B split per query group
            for proj, b_rows in zip(("q_proj", "k_proj", "v_proj"), _megatron_qkv_split(b, heads, groups, head_dim)):
                put(layer, block, proj, a, b_rows)
        elif (linear, sub) == ("linear_fc1", None):  # fused LoRA: shared A, B = [gate; up]
            for proj, b_rows in zip(("gate_proj", "up_proj"), torch.chunk(b, 2, dim=0)):
                put(layer, block, proj, a, b_rows)
        elif linear == "linear_qkv" and canonical_qkv_layout == "concatenated":
            # adapter_q/k/v are one block-diagonal update of linear_qkv: exported together, once
            trio = [adapters.get((layer, linear, s)) for s in ("adapter_q", "adapter_k", "adapter_v")]
            if None in trio:
                raise AdapterExportError(f"{parts['linear_in'][0]}: NeMo's CanonicalLoRA needs adapter_q, "
                                         "adapter_k and adapter_v together on linear_qkv")
            if sub == "adapter_q":
                for proj, (a_p, b_p) in _canonical_qkv(trio, heads, groups, head_dim).items():
                    put(layer, block, proj, a_p, b_p)
        else:
            put(layer, block, _ONE_TO_ONE[(linear, sub)], a, b)
    return out


def _hf_modules(tensors: dict) -> dict[str, tuple[int, str]]:
    """PEFT module path ("model.layers.3.self_attn.q_proj") -> (rank, projection), from the lora_A tensors."""
    modules = {}
    for name, t in tensors.items():
        m = _HF_NAME.match(name)
        if m is None or m[3] not in HF_PROJECTIONS:
            raise AdapterExportError(f"{name}: not a PEFT LoRA tensor of a Qwen2 projection")
        if m[4] == "A":
            modules[f"model.layers.{m[1]}.{m[2]}.{m[3]}"] = (t.shape[0], m[3])
    return modules


def hf_target_modules(tensors: dict[str, torch.Tensor], num_layers: int | None = None) -> list[str]:
    """PEFT target_modules for exactly the modules that have tensors: projection names when all
    layers have them, else full module paths (so PEFT adds no adapter the export leaves empty)."""
    modules = _hf_modules(tensors)
    projs = {proj for _, proj in modules.values()}
    layers = range(num_layers) if num_layers else {int(path.split(".")[2]) for path in modules}
    block = {p: "mlp" if p in ("gate_proj", "up_proj", "down_proj") else "self_attn" for p in projs}
    complete = all(f"model.layers.{i}.{block[p]}.{p}" in modules for p in projs for i in layers)
    return sorted(projs) if complete else sorted(modules)


def hf_rank_pattern(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, int]:
    """Projections whose exported rank is not `rank` (CanonicalLoRA q/k/v, see the module docstring)."""
    ranks: dict[str, set] = {}
    for r, proj in _hf_modules(tensors).values():
        ranks.setdefault(proj, set()).add(r)
    for proj, rs in ranks.items():
        if len(rs) > 1:  # a pattern keyed by projection name would be wrong for some layers
            raise AdapterExportError(f"{proj}: lora_A ranks {sorted(rs)} differ between layers")
    return {proj: r for proj, (r,) in sorted(ranks.items()) if r != rank}


def saved_modules_to_hf(state_dict: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """lora_embed's trained embedding and output layer (names as in the model's state_dict) -> PEFT
    modules_to_save tensors, without the rows Megatron pads the vocabulary with."""
    out = {}
    for name, value in state_dict.items():
        for megatron_name, (_, hf_name) in SAVED_MODULES.items():
            if name == megatron_name or name.endswith("." + megatron_name):
                if value.shape[0] < vocab_size:
                    raise AdapterExportError(f"{name}: {value.shape[0]} rows, fewer than the vocabulary's {vocab_size}")
                out[hf_name] = _own(value[:vocab_size])
    missing = [hf for _, hf in SAVED_MODULES.values() if hf not in out]
    if missing:
        raise AdapterExportError(f"a lora_embed checkpoint without {missing}: the embeddings/output layer it trained "
                                 "are not in the model")
    return out


def hf_adapter_config(*, rank: int, alpha, dropout: float, target_modules_hf, base_model_name_or_path: str,
                      rank_pattern: dict[str, int] | None = None, modules_to_save: list[str] | None = None) -> dict:
    """adapter_config.json content for PEFT's LoraConfig. The scale is alpha/rank everywhere, as in
    NeMo: a module in rank_pattern gets its alpha multiplied by the same factor as its rank."""
    targets = list(target_modules_hf)
    if not targets or any(t.rsplit(".", 1)[-1] not in HF_PROJECTIONS for t in targets):
        raise AdapterExportError(f"target_modules_hf {targets}: expected Qwen2 projections {HF_PROJECTIONS}")
    if rank <= 0 or alpha <= 0 or not 0 <= dropout < 1:
        raise AdapterExportError(f"rank={rank}, alpha={alpha}, dropout={dropout}: out of range")
    rank_pattern = dict(rank_pattern or {})
    alpha_pattern = {k: alpha * (r // rank) if r % rank == 0 else alpha * r / rank for k, r in rank_pattern.items()}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets),
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": modules_to_save or None, "layers_to_transform": None,
            "inference_mode": True}


def write_hf_peft_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """adapter_model.safetensors + adapter_config.json, written to a hidden sibling directory and
    renamed into place: out_dir is only ever absent, the previous export, or the complete new one."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    old = None
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():  # a directory cannot be renamed over a non-empty one: move it aside first
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export_adapter(state_dict: dict[str, torch.Tensor], out_dir: str | Path, *, peft_class: str, dim: int, alpha,
                   dropout: float, dropout_position: str, num_attention_heads: int, num_query_groups: int,
                   head_dim: int, base_model_name_or_path: str, num_layers: int | None = None,
                   hidden_size: int | None = None, ffn_hidden_size: int | None = None,
                   canonical_qkv_layout: str = "concatenated",
                   saved_modules: dict[str, torch.Tensor] | None = None) -> Path:
    """Settings check, tensor mapping, config and atomic write: what the NeMo connector does.
    saved_modules: PEFT modules_to_save tensors (saved_modules_to_hf), written beside the LoRA ones."""
    s = adapter_settings(peft_class, dim=dim, alpha=alpha, dropout=dropout, dropout_position=dropout_position)
    tensors = megatron_lora_to_hf_peft(state_dict, num_attention_heads=num_attention_heads,
                                       num_query_groups=num_query_groups, head_dim=head_dim,
                                       adapter_type=s["adapter_type"], rank=s["rank"], hidden_size=hidden_size,
                                       ffn_hidden_size=ffn_hidden_size, canonical_qkv_layout=canonical_qkv_layout)
    config = hf_adapter_config(rank=s["rank"], alpha=s["alpha"], dropout=s["dropout"],
                               target_modules_hf=hf_target_modules(tensors, num_layers),
                               base_model_name_or_path=base_model_name_or_path,
                               rank_pattern=hf_rank_pattern(tensors, s["rank"]),
                               modules_to_save=[m for _, (m, hf) in SAVED_MODULES.items() if hf in (saved_modules or {})])
    return write_hf_peft_adapter(out_dir, {**tensors, **(saved_modules or {})}, config)


_EXPORTER = None


def register_qwen2_hf_peft_exporter():
    """Register a connector as `io.model_exporter(Qwen2Model, "hf-peft")`, so that
    llm.export_ckpt(path=..., target="hf-peft", output_path=...) works for Qwen2 LoRA checkpoints.
    Idempotent; returns the connector class. export_ckpt passes extra keyword arguments on to
    apply(): base_model_name_or_path=... overrides the base recorded in adapter_config.json."""
    global _EXPORTER
    from nemo.collections.llm.gpt.model.qwen2 import Qwen2Model
    from nemo.lightning import io

    key = f"{Qwen2Model}hf-peft"  # how io.model_exporter keys ConnectorMixin._EXPORTERS
    if _EXPORTER is not None and Qwen2Model._EXPORTERS.get(key) is _EXPORTER:
        return _EXPORTER

    class HFQwen2PEFTExporter(io.ModelConnector["Qwen2Model", "PeftModel"]):
        """NeMo Qwen2 LoRA/CanonicalLoRA checkpoint -> Hugging Face PEFT adapter directory (jp-peft)."""

        def apply(self, output_path: Path, base_model_name_or_path: str | None = None) -> Path:
            from nemo.collections.llm.peft.canonical_lora import LoRALinearSplitQKV

            peft = io.load_context(str(self), subpath="model.model_transform")
            if peft is None:
                raise AdapterExportError(f"{self}: not a PEFT checkpoint (no model.model_transform)")
            settings = dict(peft_class=type(peft).__name__, dim=getattr(peft, "dim", None),
                            alpha=getattr(peft, "alpha", None), dropout=getattr(peft, "dropout", 0.0),
                            dropout_position=getattr(peft, "dropout_position", "pre"))
            adapter_settings(**settings)  # DoRA, unknown types, post-dropout: fail before the slow load
            source, trainer = self.nemo_load(str(self))  # the adapters (not the base), on CPU
            cfg = source.config
            from jp_peft.backends.megatron.merge import load_trained_embeddings, peft_trains_embeddings

            with_embeddings = peft_trains_embeddings(peft)
            if with_embeddings:  # lora_embed: NeMo's loader reads `.adapter.` tensors only
                load_trained_embeddings(Path(str(self)), trainer)
            state = source.state_dict()
            adapters = {k: v for k, v in state.items() if ".adapter." in k}
            saved = saved_modules_to_hf(state, cfg.vocab_size) if with_embeddings else None
            # A NeMo whose split-QKV wrapper interleaves q/k/v per group makes them one to one.
            layout = "interleaved" if hasattr(LoRALinearSplitQKV, "_interleave_qkv") else "concatenated"
            return export_adapter(
                adapters, output_path, **settings,
                num_attention_heads=cfg.num_attention_heads,
                num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
                head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
                num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
                base_model_name_or_path=base_model_name_or_path or self.base_model_name(),
                canonical_qkv_layout=layout, saved_modules=saved)

        def base_model_name(self) -> str:
            """NeMo's own guess (as in its Llama exporter): the base was imported to
            NEMO_HOME/models/<org>/<name>, so the last two parts of its path are the hub id."""
            from nemo.lightning.ckpt_utils import ADAPTER_META_FILENAME
            from nemo.lightning.io.pl import ckpt_to_weights_subdir

            meta = ckpt_to_weights_subdir(str(self), is_saving=False) / ADAPTER_META_FILENAME
            if not meta.exists():
                return ""
            return "/".join(Path(json.loads(meta.read_text())["model_ckpt_path"]).parts[-2:])

    io.model_exporter(Qwen2Model, "hf-peft")(HFQwen2PEFTExporter)
    _EXPORTER = HFQwen2PEFTExporter
    return HFQwen2PEFTExporter
