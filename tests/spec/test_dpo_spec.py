"""The dpo stage and model.quantization in the spec: what the Megatron backend refuses at plan time (one line,
exit 2, naming the field, why and the way out), the dpo section's checks, and its fingerprint rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.records.fingerprint import comparable, fingerprint
from jp_peft.spec import SpecError, load_preset, resolve_spec

REPO = Path(__file__).resolve().parents[2]
WITH_DPO = "stages=[import,data,cpt,sft,dpo,export,eval]"


def _spec(tmp_path, *overrides):
    return resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", *overrides])


def _plan(tmp_path, *args) -> subprocess.CompletedProcess:
    """The experiment script's dry run: planning only, what `--backend megatron` refuses before anything runs."""
    return subprocess.run([sys.executable, str(REPO / "experiments/qwen_lora_ja.py"), "--smoke", "--dryrun",
                           "--output-dir", str(tmp_path), *args], capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.integration
@pytest.mark.parametrize("args, field, words", [
    (["--backend", "megatron", "--stages", "import,data,cpt,sft,dpo,export"], "stages: the dpo stage",
     ("NeMo 2.7.3", "no DPO", "--backend hf", "NeMo RL")),
    (["--backend", "megatron", "model.quantization=nf4"], "model.quantization: nf4",
     ("NeMo 2.7.3", "4-bit", "--backend hf")),
])
def test_megatron_refuses_dpo_and_quantization_at_plan_time_in_one_line(tmp_path, args, field, words):
    proc = _plan(tmp_path, *args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}"), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "smoke").exists()  # nothing planned, nothing written


@pytest.mark.unit
def test_the_hf_backend_plans_dpo_and_megatron_composes_no_dpo_recipe(tmp_path):
    from jp_peft.backends import backend_of

    spec = _spec(tmp_path, WITH_DPO)
    assert spec.trained_stages == ("cpt", "sft", "dpo")
    assert not backend_of("megatron").composes("dpo")
    assert _spec(tmp_path).stages == ("import", "data", "cpt", "sft", "export", "eval")  # dpo only when named


@pytest.mark.unit
@pytest.mark.parametrize("override, message", [
    ("dpo.beta=0", "dpo.beta: must be positive"),
    ("dpo.loss_type=kto", "dpo.loss_type: 'kto' is not one of sigmoid"),
    ("dpo.method=full", "dpo.method: 'full' is not one of lora"),
    ("dpo.data.trian=x.jsonl", "dpo.data.trian: unknown field; did you mean 'train'"),
    ("model.quantization=int8", "model.quantization: 'int8' is not one of null, nf4"),
    ("model.quantization_compute_dtype=float16", "model.quantization_compute_dtype: only with model.quantization"),
    ("model.quantization=nf4 cpt.method=full", "cpt.method: model.quantization nf4 trains LoRA on a frozen 4-bit base"),
])
def test_dpo_fields_refuse_bad_values_naming_the_field(tmp_path, override, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        _spec(tmp_path, WITH_DPO, *override.split())


@pytest.mark.unit
def test_missing_preference_files_are_named_before_launch(tmp_path):
    spec = _spec(tmp_path, WITH_DPO, f"dpo.data.train={tmp_path}/none.jsonl", "dpo.data.train_source=[]")
    with pytest.raises(SpecError, match=r"dpo.data.train: .*none.jsonl not found and no train_source; write it with "
                                        r"`jp-peft data prepare --format preference`"):
        spec.check_data_files()
    spec = _spec(tmp_path, WITH_DPO, f"dpo.data.train={tmp_path}/none.jsonl", f"dpo.data.train_source=[{tmp_path}/x]")
    with pytest.raises(SpecError, match=r"dpo.data.train_source: source file .*x does not exist"):
        spec.check_data_files()


@pytest.mark.unit
def test_the_dpo_section_counts_only_for_dpo_its_export_and_eval(tmp_path):
    plain, with_dpo = _spec(tmp_path), _spec(tmp_path, WITH_DPO)
    other_beta = _spec(tmp_path, WITH_DPO, "dpo.beta=0.5")
    # a run without dpo: no dpo section and no unused later field in what is compared (old run dirs keep theirs)
    assert "dpo" not in comparable(plain.to_dict()) and "quantization" not in comparable(plain.to_dict())["model"]
    for stage in ("cpt", "sft"):  # adding dpo, or changing beta, never retrains cpt or sft
        assert fingerprint(plain, stage) == fingerprint(with_dpo, stage) == fingerprint(other_beta, stage)
    for stage in ("dpo", "export", "eval"):
        assert fingerprint(with_dpo, stage) != fingerprint(other_beta, stage)
    assert fingerprint(_spec(tmp_path, "model.quantization=nf4"), "cpt") != fingerprint(plain, "cpt")


@pytest.mark.unit
def test_the_hf_backend_reads_prepared_pairs_at_plan_time_naming_file_and_line(tmp_path):
    from jp_peft.backends import backend_of

    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "rejected": "r"}\n')
    spec = _spec(tmp_path, WITH_DPO, f"dpo.data.train={bad}", f"dpo.data.validation={good}")
    with pytest.raises(SpecError, match=rf"dpo.data.train: {bad}:2: chosen missing or not a string"):
        backend_of(spec).validate(spec)
    backend_of(spec).validate(_spec(tmp_path, WITH_DPO, f"dpo.data.train={good}", f"dpo.data.validation={good}"))
