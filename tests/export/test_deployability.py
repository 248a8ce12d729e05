"""The export record's deployability: what each artifact was verified on (the parity checks' numbers), what
refuses it and why (lora_embed adapters in vLLM and llama.cpp), the vLLM rank it needs; its one line in
`jp-peft status`, old records read back, and the plan-time warning for lora_embed."""

from __future__ import annotations

import json

import pytest

from jp_peft.export import deployability as deploy
from jp_peft.records.export_record import ExportRecord
from jp_peft.spec import load_preset

pytestmark = pytest.mark.unit

CHECKS = [{"check": "hf_merged_vs_trained", "max_abs_diff": 2.4e-6, "argmax_agreement": 1.0, "atol": 1e-4, "ok": True,
           "tolerance_reason": "fp32", "positions": 512},
          {"check": "peft_adapter_vs_hf_merged", "max_abs_diff": 3.1e-6, "argmax_agreement": 1.0, "atol": 1e-4,
           "ok": True, "tolerance_reason": "fp32", "positions": 512}]


def _record(method="lora", adapter="/run/cpt/hf_adapter", **extra):
    return ExportRecord(method=method, hf_merged="/run/cpt/hf_merged", hf_adapter=adapter,
                        adapter_base="/base" if adapter else None, checks=CHECKS, **extra)


def _entry(entries, target):
    found = [e for e in entries if e["target"] == target]
    assert len(found) == 1, entries
    return found[0]


@pytest.mark.parametrize("rank,needed", [(8, 8), (16, 16), (32, 32), (40, 64), (512, 512)])
def test_a_lora_adapter_records_its_parity_numbers_and_the_vllm_rank_it_needs(rank, needed):
    out = deploy.deployability(_record(), "smoke-cpt", {"r": rank, "modules_to_save": None})
    assert set(out) == {"hf_adapter", "hf_merged"}  # no .nemo on the hf backend
    peft = _entry(out["hf_adapter"], deploy.TRANSFORMERS_PEFT)
    assert peft["status"] == deploy.VERIFIED
    assert [(c["check"], c["max_abs_diff"], c["atol"]) for c in peft["checks"]] == [("peft_adapter_vs_hf_merged", 3.1e-6, 1e-4)]
    vllm = _entry(out["hf_adapter"], deploy.VLLM)
    assert vllm["status"] == deploy.NOT_VERIFIED and vllm["max_lora_rank"] == needed and vllm["rank"] == rank
    assert vllm["command"] == ("vllm serve /base --enable-lora --lora-modules smoke-cpt=/run/cpt/hf_adapter "
                               f"--max-lora-rank {needed}")
    merged = _entry(out["hf_merged"], deploy.TRANSFORMERS)
    assert merged["status"] == deploy.VERIFIED and merged["checks"][0]["check"] == "hf_merged_vs_trained"
    # nothing runs vLLM or llama.cpp yet: never claimed verified
    for entries in out.values():
        assert all(e["status"] != deploy.VERIFIED for e in entries if e["target"] in (deploy.VLLM, deploy.LLAMA_CPP))


def test_a_rank_above_vllms_largest_is_refused_with_the_reason():
    vllm = _entry(deploy.deployability(_record(), "n", {"r": 1024})["hf_adapter"], deploy.VLLM)
    assert vllm["status"] == deploy.REFUSED and "above the largest --max-lora-rank (512)" in vllm["reason"]


def test_a_lora_embed_adapter_is_refused_by_vllm_and_llama_cpp_with_the_reason_and_points_to_hf_merged():
    # the method decides even when the adapter's config does not say modules_to_save (a Megatron-written one)
    for config in ({"r": 32, "modules_to_save": ["embed_tokens", "lm_head"]}, {"r": 32}):
        out = deploy.deployability(_record("lora_embed"), "n", config)
        vllm, llama = _entry(out["hf_adapter"], deploy.VLLM), _entry(out["hf_adapter"], deploy.LLAMA_CPP)
        assert vllm == {"target": "vllm", "status": "refused", "reason": deploy.VLLM_REFUSES_MODULES_TO_SAVE}
        assert "_validate_features" in vllm["reason"] and vllm["reason"].endswith("use hf_merged")
        assert llama["status"] == "refused" and "convert_lora_to_gguf.py" in llama["reason"]
        assert llama["reason"].endswith("use hf_merged")
        assert _entry(out["hf_merged"], deploy.VLLM)["command"] == "vllm serve /run/cpt/hf_merged"


def test_full_has_no_adapter_and_megatron_records_the_nemo_archive():
    checks = [{**CHECKS[0], "check": "trained_vs_nemo_merged"}, {**CHECKS[0], "check": "nemo_merged_vs_hf_merged"}]
    record = ExportRecord(method="full", hf_merged="/m", hf_adapter=None, adapter_base=None, checks=checks,
                          nemo={"archive": "/run/cpt/model.nemo", "sha256": "x"})
    out = deploy.deployability(record, "n")
    assert set(out) == {"hf_merged", "nemo"}
    nemo = _entry(out["nemo"], deploy.NEMO)
    assert nemo["status"] == deploy.VERIFIED and [c["check"] for c in nemo["checks"]] == [c["check"] for c in checks]
    assert _entry(out["hf_merged"], deploy.TRANSFORMERS)["checks"][0]["check"] == "nemo_merged_vs_hf_merged"


def test_a_failed_check_verifies_nothing():
    failed = [{**c, "ok": False} for c in CHECKS]
    out = deploy.deployability(ExportRecord(method="lora", hf_merged="/m", hf_adapter="/a", adapter_base="/b",
                                            checks=failed), "n", {"r": 8})
    assert deploy.TRANSFORMERS_PEFT not in [e["target"] for e in out["hf_adapter"]]


def test_the_record_round_trips_deployability_and_reads_older_records_without_it(tmp_path):
    record = _record()
    record = ExportRecord(**{**record.to_dict(), "deployability": deploy.deployability(record, "n", {"r": 8})})
    path = tmp_path / "export.json"
    record.write(path)
    assert ExportRecord.read(path) == record
    old = {k: v for k, v in record.to_dict().items() if k != "deployability"}  # written before the field existed
    path.write_text(json.dumps(old))
    assert ExportRecord.read(path).deployability == {}


def test_status_shows_one_line_per_artifact(tmp_path):
    from jp_peft.run.status import deployability_lines

    record = _record("lora_embed")
    record = ExportRecord(**{**record.to_dict(), "deployability": deploy.deployability(record, "n", {"r": 32})})
    path = tmp_path / "export.json"
    record.write(path)
    lines = deployability_lines(path)
    assert [line.split()[0] for line in lines] == ["hf_adapter", "hf_merged"]
    assert lines[0].split(None, 1)[1] == ("transformers+peft verified (max |logit diff| 3.1e-06); vllm refused "
                                          "(refuses modules_to_save); llama.cpp refused (convert_lora_to_gguf.py "
                                          "refuses non-LoRA tensors)")
    assert "vllm not verified here" in lines[1]
    path.write_text(json.dumps({k: v for k, v in record.to_dict().items() if k != "deployability"}))
    assert deployability_lines(path) == ["    deployability: not recorded (an export by an older jp-peft; rerun the "
                                         "export stage)"]


@pytest.mark.parametrize("method,warned", [("lora", False), ("lora_embed", True)])
def test_the_plan_warns_on_stderr_when_the_method_cannot_make_a_servable_adapter(method, warned, tmp_path, capsys):
    from jp_peft.run.plan import plan

    tasks = plan(load_preset("smoke"), [f"output_dir={tmp_path}", f"cpt.method={method}"], [], dryrun=True)
    assert any(t.stage == "cpt" for t in tasks)  # a warning, not a refusal
    err = capsys.readouterr().err
    line = ("warning: cpt.method=lora_embed: its hf_adapter saves embed_tokens/lm_head (modules_to_save), which vLLM "
            "and llama.cpp refuse; serve cpt/hf_merged instead")
    assert (line in err.splitlines()) is warned, err
    if warned:
        assert err.count(line) == 1
        assert "sft.method" not in err  # only the stage that has the method
