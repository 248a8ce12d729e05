"""`jp-peft export gguf` on the shared smoke run (tiny model): the merged SFT model as f16 and q8_0 GGUF and its
lora adapter as a GGUF LoRA on a GGUF of CPT's merged model, loaded in the real llama-cpp-python and compared with
the Hugging Face fp32 model on the bundled Japanese prompts; a lora_embed adapter refused with the reason while
its merged model is exported. Needs `make deploy-tools` (llama.cpp built once into the cache): `make test-all`
runs it first; without the tools the tests skip, saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.spec import load_preset, resolve_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def deploy_tools():
    from jp_peft.export.gguf import GGUFError, converter_dir, require_llama_cpp

    try:
        converter_dir(), require_llama_cpp()
    except GGUFError as exc:
        pytest.skip(str(exc))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jp_peft.cli", *args], capture_output=True, text=True, timeout=900)


def test_sft_exports_gguf_model_and_lora_that_llama_cpp_runs_like_hf(smoke_run):
    run_dir = smoke_run[0]
    done = _cli("export", "gguf", str(run_dir), "--stage", "sft", "--type", "f16,q8_0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout + "\n".join(l for l in done.stderr.splitlines() if "gguf" in l))
    record = json.loads((run_dir / "sft" / "export.json").read_text())
    gguf = record["gguf"]
    checks = {c["check"]: c for c in gguf["checks"]}
    assert set(checks) == {"gguf_f16_vs_hf_merged", "gguf_q8_0_vs_hf_merged", "gguf_lora_vs_hf_merged"}
    assert all(c["ok"] for c in checks.values()), checks
    for name in ("gguf_f16_vs_hf_merged", "gguf_lora_vs_hf_merged"):  # llama.cpp's tokenizer gives HF's ids
        assert checks[name]["tokens_equal"] and checks[name]["max_abs_diff"] <= checks[name]["atol"]
        assert checks[name]["f16_gap"] > 0
    assert checks["gguf_q8_0_vs_hf_merged"]["ppl_ratio"] <= 1.05
    for name, info in gguf["files"].items():
        assert Path(info["path"]).stat().st_size == info["bytes"], name
    assert sorted(gguf["files"]) == ["base-f16", "lora-f16", "model-f16", "model-q8_0"]
    # the adapter's GGUF base is the model the adapter applies to: CPT's merged model
    assert record["adapter_base"] == str((run_dir / "cpt" / "hf_merged").resolve())
    llama = {artifact: [e for e in entries if e["target"] == "llama.cpp"]
             for artifact, entries in record["deployability"].items()}
    assert [e["status"] for e in llama["hf_merged"]] == ["verified"]
    assert [e["status"] for e in llama["hf_adapter"]] == ["verified"]
    assert llama["hf_adapter"][0]["via"] == [gguf["files"]["lora-f16"]["path"], gguf["files"]["base-f16"]["path"]]
    # the check bites: the base GGUF without the LoRA is far outside the bound the adapter met
    from jp_peft.export.gguf import hf_logits, llama_logits, prompt_ids

    texts, ids = prompt_ids(run_dir / "sft" / "hf_merged")
    bare, _ = llama_logits(Path(gguf["files"]["base-f16"]["path"]), ids)
    without_lora = float((bare - hf_logits(run_dir / "sft" / "hf_merged", ids)).abs().max())
    print(f"base GGUF without the LoRA: max |logit diff| {without_lora:.3e} (bound {checks['gguf_lora_vs_hf_merged']['atol']:.2e})")
    assert without_lora > 3 * checks["gguf_lora_vs_hf_merged"]["atol"]
    status = _cli("status", str(run_dir))
    assert "llama.cpp verified" in status.stdout, status.stdout


def test_a_lora_embed_adapter_is_refused_for_gguf_and_its_merged_model_exported(smoke_run, tmp_path):
    run_dir = smoke_run[0]
    spec = resolve_spec(load_preset("smoke"), [
        f"output_dir={run_dir.parent}", "name=gguf_embed", "group=smoke", "stages=[cpt,export]", "wandb.enabled=false",
        "cpt.method=lora_embed", "cpt.train.max_steps=2", "cpt.train.val_check_interval=2",
        "cpt.train.limit_val_batches=1", "cpt.train.warmup_steps=0"])
    path = tmp_path / "embed.json"
    path.write_text(json.dumps(spec.to_dict()))
    (spec.run_dir).mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "spec.json").write_text(json.dumps(spec.to_dict()))
    for args in (("stage", "cpt"), ("stage", "export", "--target", "cpt")):
        proc = _cli(*args, "--spec", str(path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = _cli("export", "gguf", str(spec.run_dir), "--stage", "cpt")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cpt/hf_adapter not converted (llama.cpp: convert_lora_to_gguf.py refuses non-LoRA tensors" in done.stdout
    gguf = json.loads((spec.run_dir / "cpt" / "export.json").read_text())["gguf"]
    assert sorted(gguf["files"]) == ["model-f16"] and gguf["adapter_refused"].startswith("llama.cpp: ")
    assert [c["check"] for c in gguf["checks"]] == ["gguf_f16_vs_hf_merged"] and gguf["checks"][0]["ok"]


def test_bad_input_exits_2_naming_it_before_anything_is_written(smoke_run, tmp_path):
    run_dir = smoke_run[0]
    cases = {(str(tmp_path), "sft", "f16"): f"error: RUN_DIR: {tmp_path}/spec.json not found (a run directory holds "
                                                    "spec.json)",
             (str(run_dir), "eval", "f16"): "error: --stage: eval is not a trained stage of this run (cpt, sft)",
             (str(run_dir), "cpt", "q4_k"): "error: --type: q4_k is not one of f16, q8_0"}
    for (where, stage, gguf_type), message in cases.items():
        proc = _cli("export", "gguf", where, "--stage", stage, "--type", gguf_type)
        assert (proc.returncode, proc.stderr.strip()) == (2, message)
    assert not (run_dir / "cpt" / "gguf").exists()
