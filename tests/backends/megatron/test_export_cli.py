"""`jp-peft export adapter|nemo` on something that is not a NeMo 2 checkpoint: exit 2 naming what is
missing, answered before NeMo is imported, and no archive that claims to be verified."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

# main() in a fresh interpreter, then whether NeMo was imported on the way.
RUN_MAIN = """
import sys
from jp_peft.cli import main
code = main(sys.argv[1:])
print("nemo imported" if "nemo" in sys.modules else "nemo not imported")
sys.exit(code)
"""


def export(*args):
    return subprocess.run([sys.executable, "-c", RUN_MAIN, "export", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def not_a_checkpoint(tmp_path, kind):
    path = tmp_path / "ckpt"
    if kind == "file":
        path.write_text("not a checkpoint")
    elif kind == "empty_dir":
        path.mkdir()
    elif kind == "no_context":
        (path / "weights").mkdir(parents=True)
        (path / "weights" / "metadata.json").write_text("{}")
    elif kind == "no_weights":
        (path / "context").mkdir(parents=True)
        (path / "context" / "io.json").write_text("{}")
    return path


@pytest.mark.parametrize("kind, missing", [
    ("file", "is a file, not a NeMo 2 checkpoint directory"),
    ("empty_dir", "missing or empty context/; missing or empty weights/"),
    ("no_context", "missing or empty context/"),
    ("no_weights", "missing or empty weights/"),
    ("absent", "does not exist"),
])
def test_export_adapter_refuses_what_is_not_a_checkpoint_before_importing_nemo(tmp_path, kind, missing):
    ckpt = not_a_checkpoint(tmp_path, kind)
    proc = export("adapter", "--checkpoint", ckpt, "--output", tmp_path / "hf_adapter")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: --checkpoint: {ckpt}") and missing in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == "nemo not imported"
    assert not (tmp_path / "hf_adapter").exists()


def partial_context(root, kind):
    (root / "context").mkdir(parents=True)
    (root / "weights").mkdir()
    (root / "weights" / "metadata.json").write_text("{}")
    if kind == "empty_subdir":
        (root / "context" / "nemo_tokenizer").mkdir()
    elif kind == "no_io_json":
        (root / "context" / "model.yaml").write_text("_target_: nemo.collections.llm.gpt.model.qwen2.Qwen2Model\n")
    elif kind == "truncated_io_json":
        (root / "context" / "io.json").write_text(json.dumps({"root": {"type": "Qwen2Model"}})[:12])
    return root


@pytest.mark.parametrize("kind, missing", [
    ("empty_subdir", "missing or empty context/"),
    ("no_io_json", "no context/io.json"),
    ("truncated_io_json", "context/io.json is not a JSON object"),
])
def test_export_nemo_of_an_empty_or_partial_context_is_an_error_not_verified(tmp_path, kind, missing):
    ckpt = partial_context(tmp_path / "ckpt", kind)
    proc = export("nemo", "--checkpoint", ckpt, "--output", tmp_path / "model.nemo")
    assert proc.returncode == 2 and missing in proc.stderr and "verified" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no archive, no temporary file
