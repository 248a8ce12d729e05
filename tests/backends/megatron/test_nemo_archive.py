"""The .nemo archive round-trips byte for byte and refuses what is not a checkpoint."""

import json
import tarfile

import pytest
import torch

from jp_peft.backends.megatron.nemo_archive import ArchiveError, verify_nemo_archive, write_nemo_archive

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
