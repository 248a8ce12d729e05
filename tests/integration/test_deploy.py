"""Deployment of the shared smoke run's exports (tiny model) with the real tools. `jp-peft export gguf`: the merged
SFT model as f16 and q8_0 GGUF and its lora adapter as a GGUF LoRA on a GGUF of CPT's merged model, loaded in
llama-cpp-python and compared with the Hugging Face fp32 model on the bundled Japanese prompts. `jp-peft serve
--check`: vLLM's OpenAI-compatible server (the CPU build) on 127.0.0.1 serving the lora adapter with
--enable-lora and the merged model plainly, greedy tokens and top-5 logprobs against HF. A lora_embed run: its
adapter refused by both with the reason, its merged model exported and served instead. Needs `make
deploy-tools` (llama.cpp built and vLLM installed once into the cache): `make test-all` runs it first; without
the tools the tests skip, saying so."""

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
    from jp_peft.export.vllm_serve import default_python

    try:
        converter_dir(), require_llama_cpp()
    except GGUFError as exc:
        pytest.skip(str(exc))
    if not default_python().is_file():
        pytest.skip(f"{default_python()} not found: run make deploy-tools")


@pytest.fixture(scope="module")
def embed_run(smoke_run, tmp_path_factory):
    """A lora_embed CPT of 2 steps in the smoke group, exported: the adapter vLLM and llama.cpp refuse."""
    run_dir = smoke_run[0]
    spec = resolve_spec(load_preset("smoke"), [
        f"output_dir={run_dir.parent}", "name=deploy_embed", "group=smoke", "stages=[cpt,export]",
        "wandb.enabled=false", "cpt.method=lora_embed", "cpt.train.max_steps=2", "cpt.train.val_check_interval=2",
        "cpt.train.limit_val_batches=1", "cpt.train.warmup_steps=0"])
    path = tmp_path_factory.mktemp("embed") / "embed.json"
    path.write_text(json.dumps(spec.to_dict()))
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    (spec.run_dir / "spec.json").write_text(json.dumps(spec.to_dict()))
    for args in (("stage", "cpt"), ("stage", "export", "--target", "cpt")):
        proc = _cli(*args, "--spec", str(path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return spec.run_dir


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
    from jp_peft.export.gguf import hf_logits, llama_logits
    from jp_peft.export.parity import prompt_ids

    texts, ids = prompt_ids(run_dir / "sft" / "hf_merged")
    bare, _ = llama_logits(Path(gguf["files"]["base-f16"]["path"]), ids)
    without_lora = float((bare - hf_logits(run_dir / "sft" / "hf_merged", ids)).abs().max())
    print(f"base GGUF without the LoRA: max |logit diff| {without_lora:.3e} (bound {checks['gguf_lora_vs_hf_merged']['atol']:.2e})")
    assert without_lora > 3 * checks["gguf_lora_vs_hf_merged"]["atol"]
    status = _cli("status", str(run_dir))
    assert "llama.cpp verified" in status.stdout, status.stdout


def test_a_lora_embed_adapter_is_refused_for_gguf_and_its_merged_model_exported(embed_run):
    done = _cli("export", "gguf", str(embed_run), "--stage", "cpt")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cpt/hf_adapter not converted (llama.cpp: convert_lora_to_gguf.py refuses non-LoRA tensors" in done.stdout
    gguf = json.loads((embed_run / "cpt" / "export.json").read_text())["gguf"]
    assert sorted(gguf["files"]) == ["model-f16"] and gguf["adapter_refused"].startswith("llama.cpp: ")
    assert [c["check"] for c in gguf["checks"]] == ["gguf_f16_vs_hf_merged"] and gguf["checks"][0]["ok"]


def _serve_check(run_dir: Path, stage: str, port: int, *extra: str) -> tuple[dict, str]:
    done = _cli("serve", str(run_dir), "--stage", stage, "--check", "--port", str(port), *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print("\n".join(line for line in done.stdout.splitlines() if "[jp-peft] serve" in line))
    return json.loads((run_dir / stage / "export.json").read_text()), done.stdout


def _vllm_entry(record: dict, artifact: str) -> dict:
    (entry,) = [e for e in record["deployability"][artifact] if e["target"] == "vllm"]
    return entry


def test_vllm_serves_the_lora_adapter_with_enable_lora_like_hf(smoke_run):
    run_dir = smoke_run[0]
    record, stdout = _serve_check(run_dir, "sft", 8771)
    entry = _vllm_entry(record, "hf_adapter")
    assert entry["status"] == "verified", entry
    (check,) = entry["checks"]
    assert check["check"] == "vllm_hf_adapter_vs_hf_merged" and check["greedy_equal"]
    assert check["max_abs_logprob_diff"] <= check["atol"] == 1e-4 and 0 < check["positions"] <= 32  # EOS may end early
    assert "--enable-lora --lora-modules smoke-sft=" in check["command"] and "--max-lora-rank 32" in check["command"]
    assert f"--model {run_dir / 'cpt' / 'hf_merged'}" in check["command"]  # on the base the adapter names
    assert not subprocess.run(["pgrep", "-f", "vllm.entrypoints.*--port 8771"], capture_output=True).stdout
    card = (run_dir / "sft" / "hf_adapter" / "README.md").read_text()
    assert "vllm_hf_adapter_vs_hf_merged: greedy tokens equal" in card


def test_vllm_serves_the_merged_model_plainly_like_hf(smoke_run):
    run_dir = smoke_run[0]
    record, _ = _serve_check(run_dir, "cpt", 8772, "--merged")
    (check,) = _vllm_entry(record, "hf_merged")["checks"]
    assert check["check"] == "vllm_hf_merged_vs_hf_merged" and check["ok"] and "--enable-lora" not in check["command"]


def test_a_lora_embed_stage_is_served_as_its_merged_model_saying_why(embed_run):
    done = _cli("serve", str(embed_run), "--stage", "cpt")
    assert done.returncode == 0, done.stderr
    assert f"--model {embed_run / 'cpt' / 'hf_merged'} " in done.stdout and "--enable-lora" not in done.stdout
    assert "cpt: hf_merged, the merged model (vllm: refuses modules_to_save" in done.stderr


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
