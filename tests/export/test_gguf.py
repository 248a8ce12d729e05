"""The GGUF export's pure parts: which tokenizers the converter adaptation answers with "qwen2" (exactly Qwen2's
pre-tokenizer: the tiny model's and Qwen2.5's own, nothing else), and how a passed GGUF export turns the
llama.cpp entries of the deployability record into verified ones while a refusal stays."""

from __future__ import annotations

import copy
import json

import pytest

from jp_peft.export.deployability import LLAMA_CPP, NOT_VERIFIED, REFUSED, VERIFIED, with_gguf
from jp_peft.export.gguf_convert import is_qwen2_pre_tokenizer

pytestmark = pytest.mark.unit


def test_only_qwen2s_own_pre_tokenizer_is_answered_with_qwen2(tiny_base):
    from jp_peft.models.qwen_tokenizer import ensure_qwen25_tokenizer

    tiny = json.loads((tiny_base / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    real = json.loads((ensure_qwen25_tokenizer(log=lambda *_: None) / "tokenizer.json").read_text(
        encoding="utf-8"))["pre_tokenizer"]
    assert is_qwen2_pre_tokenizer(tiny) and is_qwen2_pre_tokenizer(real)
    other_regex = copy.deepcopy(tiny)
    other_regex["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    byte_level_regex = copy.deepcopy(tiny)
    byte_level_regex["pretokenizers"][1]["use_regex"] = True
    for pre in (other_regex, byte_level_regex, {"type": "ByteLevel"}, None):
        assert not is_qwen2_pre_tokenizer(pre)


def _gguf(with_lora: bool) -> dict:
    files = {"model-f16": {"path": "/r/sft/gguf/model-f16.gguf", "bytes": 1, "sha256": "a"}}
    checks = [{"check": "gguf_f16_vs_hf_merged", "max_abs_diff": 1e-3, "atol": 2e-3, "argmax_agreement": 1.0,
               "positions": 10, "f16_gap": 5e-4, "tokens_equal": True, "ok": True}]
    if with_lora:
        files |= {"base-f16": {"path": "/r/sft/gguf/base-f16.gguf", "bytes": 1, "sha256": "b"},
                  "lora-f16": {"path": "/r/sft/gguf/lora-f16.gguf", "bytes": 1, "sha256": "c"}}
        checks.append({**checks[0], "check": "gguf_lora_vs_hf_merged", "max_abs_diff": 1.5e-3})
    return {"files": files, "checks": checks, "adapter_refused": None if with_lora else "llama.cpp: refuses"}


def test_a_passed_gguf_export_verifies_llama_cpp_and_keeps_refusals():
    deploy = {"hf_adapter": [{"target": "transformers+peft", "status": VERIFIED, "checks": []},
                             {"target": LLAMA_CPP, "status": NOT_VERIFIED, "note": "..."}],
              "hf_merged": [{"target": LLAMA_CPP, "status": NOT_VERIFIED, "note": "..."}]}
    out = with_gguf(deploy, _gguf(with_lora=True))
    (merged,) = [e for e in out["hf_merged"] if e["target"] == LLAMA_CPP]
    (adapter,) = [e for e in out["hf_adapter"] if e["target"] == LLAMA_CPP]
    assert merged["status"] == adapter["status"] == VERIFIED
    assert merged["via"] == ["/r/sft/gguf/model-f16.gguf"] and [c["check"] for c in merged["checks"]] == [
        "gguf_f16_vs_hf_merged"]
    assert adapter["via"] == ["/r/sft/gguf/lora-f16.gguf", "/r/sft/gguf/base-f16.gguf"]
    assert adapter["checks"][0]["max_abs_diff"] == 1.5e-3 and adapter["checks"][0]["tokens_equal"] is True
    assert out["hf_adapter"][0]["target"] == "transformers+peft"  # other targets untouched

    refused = {"hf_adapter": [{"target": LLAMA_CPP, "status": REFUSED, "reason": "llama.cpp: refuses"}],
               "hf_merged": [{"target": LLAMA_CPP, "status": NOT_VERIFIED}]}
    out = with_gguf(refused, _gguf(with_lora=False))
    assert out["hf_adapter"] == refused["hf_adapter"]
    assert [e["status"] for e in out["hf_merged"]] == [VERIFIED]


def test_an_unknown_type_is_refused_before_anything_is_read(tmp_path):
    from jp_peft.export.gguf import GGUFError, export_gguf
    from jp_peft.spec import load_preset, resolve_spec

    spec = resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}"])
    with pytest.raises(GGUFError, match=r"^--type: q4_k is not one of f16, q8_0$"):
        export_gguf(spec, "cpt", ("q4_k",))
