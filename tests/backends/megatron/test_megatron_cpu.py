"""The CPU adaptation layer: every adaptation still matches the pinned upstream, applies, refuses any
other version, never runs where CUDA is, and leaves upstream as it was when disabled.

The NeMo tier at the end imports the tiny model through NeMo's real importer: with the layer's
Transformer Engine norm mapping the NeMo model's logits equal the Hugging Face model's; without it
NeMo only warns and imports norms of 1.0 -- the silently wrong import the layer exists to prevent.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from jp_peft.backends.megatron import cpu as megatron_cpu



@pytest.fixture
def clean_layer():
    megatron_cpu.disable()
    yield
    megatron_cpu.disable()


@pytest.mark.unit
def test_every_adaptation_names_its_upstream_line_and_matches_the_pinned_source():
    assert len(megatron_cpu.ADAPTATIONS) >= 30
    for adaptation in megatron_cpu.ADAPTATIONS:
        assert ".py:" in adaptation.where and adaptation.why, adaptation.target
        assert megatron_cpu.source_sha256(adaptation.target) == adaptation.sha256, adaptation.target
        source = megatron_cpu.upstream_source(adaptation.target)
        for old, _new, *count in adaptation.edits:
            assert source.count(old) == (count[0] if count else 1), (adaptation.target, old)


@pytest.mark.unit
def test_enable_applies_every_adaptation_and_disable_restores_upstream(clean_layer):
    originals = {a.target: megatron_cpu._resolve(a.target).__code__ for a in megatron_cpu.ADAPTATIONS}
    applied = megatron_cpu.enable()
    assert sorted(set(applied)) == sorted(originals)  # CPU, no TE, torch AdamW: every kind applies here
    for target, code in originals.items():
        func = megatron_cpu._resolve(target)
        assert func.__code__ is not code, target
        # tracebacks still point at upstream's file and (for the def line) upstream's line number
        assert func.__code__.co_filename == code.co_filename
    assert megatron_cpu.enable() == applied  # idempotent
    megatron_cpu.disable()
    for target, code in originals.items():
        assert megatron_cpu._resolve(target).__code__ is code, target


@pytest.mark.unit
def test_an_adapted_function_runs_the_edit(clean_layer):
    """megatron's no-TE l2-norm fallback returns its result on 'cuda': on CPU torch it raises before,
    and computes the norm after."""
    import torch
    from megatron.core.utils import local_multi_tensor_l2_norm

    tensors = [[torch.tensor([3.0]), torch.tensor([4.0])]]
    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        local_multi_tensor_l2_norm(0, None, tensors, False)
    megatron_cpu.enable()
    norm, _ = local_multi_tensor_l2_norm(0, None, tensors, False)
    assert float(norm) == pytest.approx(5.0)


@pytest.mark.unit
def test_other_upstream_code_is_refused_loudly(clean_layer, monkeypatch):
    adaptation = megatron_cpu.ADAPTATIONS[0]
    monkeypatch.setattr(megatron_cpu, "ADAPTATIONS", (dataclasses.replace(adaptation, sha256="0" * 16),))
    with pytest.raises(megatron_cpu.MegatronCpuError, match="is not the code jp-peft adapts"):
        megatron_cpu.enable()
    missing_text = dataclasses.replace(adaptation, edits=(("no such upstream text", "x"),))
    monkeypatch.setattr(megatron_cpu, "ADAPTATIONS", (missing_text,))
    with pytest.raises(megatron_cpu.MegatronCpuError, match="expected 'no such upstream text' 1 time"):
        megatron_cpu.enable()


@pytest.mark.unit
def test_other_versions_are_refused(monkeypatch):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(megatron_cpu.metadata, "version",
                        lambda name: "2.8.0" if name == "nemo_toolkit" else real(name))
    with pytest.raises(megatron_cpu.MegatronCpuError, match="nemo_toolkit 2.8.0 is installed"):
        megatron_cpu.check_versions()


@pytest.mark.unit
def test_never_applied_where_cuda_is_available(clean_layer, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(megatron_cpu.MegatronCpuError, match="CUDA is available"):
        megatron_cpu.enable()
    assert not megatron_cpu._ORIGINAL_CODE  # nothing was touched
    # a GPU machine gets only what it lacks (TE, fused Adam): nothing CUDA-related
    kinds = megatron_cpu.missing_on_gpu()
    assert "cuda" not in kinds


@pytest.mark.unit
def test_closures_and_properties_keep_working(clean_layer):
    """Adapted methods that use zero-argument super() keep their __class__ cell; properties adapt their getter."""
    megatron_cpu.enable()
    with_closure = [a.target for a in megatron_cpu.ADAPTATIONS if megatron_cpu._resolve(a.target).__code__.co_freevars]
    assert with_closure, "expected at least one adapted method with a closure (super())"
    from nemo.lightning.pytorch.callbacks.preemption import PreemptionCallback

    assert isinstance(inspect.getattr_static(PreemptionCallback, "interrupted"), property)
    callback = PreemptionCallback()
    callback._interrupted = False
    assert callback.interrupted is False  # not initialised distributed: no broadcast, no CUDA tensor


@pytest.mark.megatron_cpu
def test_imported_logits_equal_hf_only_with_the_norm_mapping(tiny_base, tmp_path, clean_layer):
    """NeMo's Qwen2 importer maps HF norms to TE's fused names; without TE the local layer spec has its
    own names. Imported with the mapping, logits equal the HF model's (fp32); NeMo's own mapping leaves
    every norm at 1.0 and only warns."""
    import subprocess
    import sys

    script = f"""
import sys, torch
from jp_peft.backends.megatron import cpu as megatron_cpu
from jp_peft.export import parity
from jp_peft.backends.megatron.merge import nemo_logits
from nemo.collections import llm
megatron_cpu.enable()
if sys.argv[1] == "upstream-norms":
    for a in megatron_cpu.ADAPTATIONS:
        if a.target.endswith("HFQwen2Importer.convert_state"):
            megatron_cpu._resolve(a.target).__code__ = megatron_cpu._ORIGINAL_CODE[a.target]
out = sys.argv[2]
llm.import_ckpt(model=llm.Qwen2Model(llm.Qwen2Config(num_layers=4, hidden_size=192, ffn_hidden_size=512,
    num_attention_heads=6, num_query_groups=2)), source="hf://{tiny_base}", output_path=out, overwrite=True)
ids = parity.random_ids(2048)
print("DIFF", float((parity.hf_logits("{tiny_base}", ids) - nemo_logits(out, ids)).abs().max()))
"""
    diffs = {}
    for mode in ("mapped", "upstream-norms"):
        proc = subprocess.run([sys.executable, "-c", script, mode, str(tmp_path / mode)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        diffs[mode] = float(proc.stdout.split("DIFF")[-1])
        if mode == "upstream-norms":
            assert "No matches found for source key" in proc.stdout + proc.stderr
    assert diffs["mapped"] <= 1e-4
    assert diffs["upstream-norms"] > 1e-2
