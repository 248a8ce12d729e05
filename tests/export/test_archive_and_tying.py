"""The .nemo archive round-trips byte for byte; merged exports keep the trained output layer."""

import json
import tarfile

import pytest
import torch

from jp_peft.export.megatron import fix_tied_embeddings
from jp_peft.export.nemo_archive import ArchiveError, verify_nemo_archive, write_nemo_archive

pytestmark = pytest.mark.unit


def fake_checkpoint(root):
    """A directory shaped like a NeMo 2 checkpoint: context/ (io.json, model.yaml) and weights/ (dist ckpt)."""
    (root / "context").mkdir(parents=True)
    (root / "weights").mkdir()
    (root / "context" / "io.json").write_text(json.dumps({"root": {"type": "Qwen2Model"}}))
    (root / "context" / "model.yaml").write_text("_target_: nemo.collections.llm.gpt.model.qwen2.Qwen2Model\n")
    (root / "weights" / "metadata.json").write_text("{}")
    torch.save({"w": torch.arange(10)}, root / "weights" / "common.pt")
    return root


def test_archive_contains_exactly_the_checkpoint(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "ckpt")
    report = write_nemo_archive(ckpt, tmp_path / "out" / "model.nemo")
    assert report["verified_files"] == report["files"] == 4
    with tarfile.open(tmp_path / "out" / "model.nemo") as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == [
            "context/io.json", "context/model.yaml", "weights/common.pt", "weights/metadata.json"]
        tar.extractall(tmp_path / "unpacked")
    assert torch.equal(torch.load(tmp_path / "unpacked" / "weights" / "common.pt")["w"], torch.arange(10))
    (ckpt / "weights" / "common.pt").write_bytes(b"changed")
    with pytest.raises(ArchiveError, match="changed"):
        verify_nemo_archive(tmp_path / "out" / "model.nemo", ckpt)


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "x" / "weights").mkdir(parents=True)
    with pytest.raises(ArchiveError, match="missing or empty context/"):
        write_nemo_archive(tmp_path / "x", tmp_path / "x.nemo")
    assert not (tmp_path / "x.nemo").exists()


def test_untied_output_layer_survives_the_export(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(tmp_path)
    # what an exporter copying HF Qwen2.5-0.5B's config would write: "tied", with a separate lm_head
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert fix_tied_embeddings(tmp_path) is True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert fix_tied_embeddings(tmp_path) is False  # now consistent
