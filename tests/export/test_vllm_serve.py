"""What `jp-peft serve` chooses and prints, from the export record alone (the server itself: the slow
tests/integration/test_deploy.py): the lora adapter on its base with the --max-lora-rank its rank needs, the merged
model where vLLM refuses the adapter (lora_embed) or there is none (full), and one-line refusals."""

from __future__ import annotations

import json

import pytest

from jp_peft.cli import main as jp_peft
from jp_peft.export.deployability import deployability
from jp_peft.export.vllm_serve import command, serve_plan
from jp_peft.records.export_record import ExportRecord
from jp_peft.spec import load_preset, resolve_spec

pytestmark = pytest.mark.unit


def _record(method: str, rank: int = 32) -> ExportRecord:
    adapter = None if method == "full" else "/r/sft/hf_adapter"
    record = ExportRecord(method=method, hf_merged="/r/sft/hf_merged", hf_adapter=adapter, adapter_base="/r/cpt/hf_merged")
    config = {"r": rank, "modules_to_save": ["embed_tokens", "lm_head"] if method == "lora_embed" else None}
    return ExportRecord(**{**record.to_dict(), "deployability": deployability(record, "x-sft", config)})


@pytest.fixture
def spec(tmp_path):
    return resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", "name=x"])


def test_a_lora_adapter_is_served_on_its_base_with_the_rank_it_needs(spec):
    for rank, needed in ((8, 8), (32, 32), (33, 64)):
        plan = serve_plan(spec, "sft", _record("lora", rank))
        assert (plan.artifact, plan.model, plan.lora, plan.max_lora_rank) == (
            "hf_adapter", "/r/cpt/hf_merged", ("x-sft", "/r/sft/hf_adapter"), needed)
    argv = command(serve_plan(spec, "sft", _record("lora")), "/v/bin/python", port=8123)
    assert argv[:8] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/r/cpt/hf_merged",
                        "--host", "127.0.0.1", "--port"]
    assert argv[9:15] == ["--enable-lora", "--lora-modules", "x-sft=/r/sft/hf_adapter", "--max-lora-rank", "32",
                          "--dtype"]
    assert "--enforce-eager" not in command(serve_plan(spec, "sft", _record("lora")), "py", cpu=False)


def test_the_merged_model_where_vllm_takes_no_adapter_saying_why(spec):
    embed = serve_plan(spec, "sft", _record("lora_embed"))
    assert (embed.artifact, embed.model, embed.lora) == ("hf_merged", "/r/sft/hf_merged", None)
    assert embed.why.startswith("the merged model (vllm: refuses modules_to_save")
    assert serve_plan(spec, "sft", _record("full")).why == "the merged model (method full: no adapter)"
    assert serve_plan(spec, "sft", _record("lora", 1024)).why.startswith("the merged model (vllm: rank 1024 is above")
    assert serve_plan(spec, "sft", _record("lora"), merged=True).artifact == "hf_merged"
    assert "--enable-lora" not in command(embed, "py")


def test_bad_input_exits_2_with_one_line(spec, tmp_path, capsys):
    assert jp_peft(["serve", str(tmp_path / "nowhere"), "--stage", "sft"]) == 2
    assert capsys.readouterr().err == f"error: RUN_DIR: {tmp_path}/nowhere/spec.json not found (a run directory holds spec.json)\n"
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "spec.json").write_text(json.dumps(spec.to_dict()))
    assert jp_peft(["serve", str(spec.run_dir), "--stage", "eval"]) == 2
    assert "error: --stage: eval is not a trained stage of this run (cpt, sft)" in capsys.readouterr().err
    assert jp_peft(["serve", str(spec.run_dir), "--stage", "sft"]) == 2  # not exported yet
    assert "export.json" in capsys.readouterr().err
    (spec.run_dir / "sft").mkdir()
    _record("lora").write(spec.run_dir / "sft" / "export.json")
    assert jp_peft(["serve", str(spec.run_dir), "--stage", "sft", "--check", "--python", str(tmp_path / "py")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --python: {tmp_path}/py not found: run make deploy-tools")
    assert jp_peft(["serve", str(spec.run_dir), "--stage", "sft"]) == 0
    out = capsys.readouterr()
    assert "--lora-modules x-sft=/r/sft/hf_adapter --max-lora-rank 32" in out.out and "requests name the model 'x-sft'" in out.err
