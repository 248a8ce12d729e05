"""Records with one owner: the layout's per-stage record, the export record, StageMetrics from a train log,
the fingerprints, and package data found without a checkout's layout."""

from __future__ import annotations

import json
import math

import pytest

from jp_peft.records import layout
from jp_peft.records.export_record import ExportRecord
from jp_peft.records.fingerprint import fingerprint
from jp_peft.records.layout import MissingRecord
from jp_peft.records.metrics import StageMetrics, gain_fraction, relative_forgetting, relative_gain, validation_row
from jp_peft.spec import SpecError, load_preset, preset_path, resolve_spec

pytestmark = pytest.mark.unit


@pytest.fixture
def spec(tmp_path):
    return resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}"])


def test_each_stage_names_the_record_it_writes_last(spec):
    run, group = spec.run_dir, spec.group_dir
    assert layout.stage_record(spec, "import") == group / "import" / "base.json"
    assert layout.stage_record(spec, "data") == group / "data" / "prepared.json"
    assert layout.stage_record(spec, "cpt") == run / "cpt" / "metrics.json"
    assert layout.stage_record(spec, "export", "sft") == run / "sft" / "export.json"
    assert layout.stage_record(spec, "eval") == run / "summary.json"


def test_sft_starts_from_the_exported_cpt_model(spec):
    with pytest.raises(MissingRecord, match="sft starts from the exported cpt result"):
        layout.stage_start_hf(spec, "sft")
    ExportRecord(method="lora", hf_merged=str(layout.hf_merged(spec, "cpt")), hf_adapter=None,
                 adapter_base=None).write(layout.export_record(spec, "cpt"))
    assert layout.stage_start_hf(spec, "sft") == str(layout.hf_merged(spec, "cpt").resolve())


def test_the_export_record_round_trips_and_names_what_is_missing(tmp_path):
    record = ExportRecord(method="lora", hf_merged="/m", hf_adapter="/a", adapter_base="/b",
                          checks=[{"check": "x", "max_abs_diff": 1e-6, "ok": True}], spec_fingerprint="f")
    path = tmp_path / "export.json"
    record.write(path)
    assert ExportRecord.read(path) == record and record.check("x")["max_abs_diff"] == 1e-6
    path.write_text(json.dumps({"method": "lora", "hf_merged": "/m"}))
    with pytest.raises(MissingRecord, match="missing field\\(s\\) hf_adapter, adapter_base"):
        ExportRecord.read(path)


def test_stage_metrics_from_a_train_log_by_hand(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [{"trainer/global_step": 1, "train/loss": 3.0, "perf/tokens_per_s": 100.0, "perf/step_time_s": 2.0,
             "perf/consumed_tokens": 200},
            {"trainer/global_step": 1, "val/ja_loss": 2.5},  # a validation row: not a step
            {"trainer/global_step": 2, "train/loss": 2.0, "perf/tokens_per_s": 300.0, "perf/step_time_s": 1.0,
             "perf/consumed_tokens": 500}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = StageMetrics.from_train_log(log, stage="cpt", backend="hf", steps=2, base_model="b", base_val_loss_ja=1.0,
                                    base_val_loss_en=1.0, val_loss_ja=1.0, val_loss_en=1.0, trainable_params=1,
                                    total_params=2, wall_seconds=3.0, precision="32")
    # tokens: 100 x 2 + 300 x 1 = 500 over 3 s of step time
    assert (m.train_loss_first, m.train_loss_last, m.consumed_tokens) == (3.0, 2.0, 500)
    assert m.tokens_per_second == pytest.approx(500 / 3, rel=1e-12)


def test_gain_and_forgetting_by_hand():
    assert relative_gain(800.0, 760.0) == pytest.approx(5.0, rel=1e-12)       # (800 - 760) / 800
    assert relative_forgetting(300.0, 303.0) == pytest.approx(1.0, rel=1e-12)  # (303 - 300) / 300
    row = validation_row(8, {"ja": math.log(760.0), "en": math.log(303.0)},
                         {"ja": math.log(800.0), "en": math.log(300.0)})
    assert row["trainer/global_step"] == 8
    assert row["val/ja_ppl"] == pytest.approx(760.0) and row["val/en_ppl"] == pytest.approx(303.0)
    assert row["val/ja_ppl_gain"] == pytest.approx(0.05) and row["val/en_ppl_forgetting"] == pytest.approx(0.01)
    assert gain_fraction(math.exp(math.log(800.0)), math.exp(math.log(760.0))) == row["val/ja_ppl_gain"]  # one formula


def test_only_the_eval_stage_counts_the_eval_section(tmp_path):
    smoke = load_preset("smoke")
    a = resolve_spec(smoke, [f"output_dir={tmp_path}"])
    b = resolve_spec(smoke, [f"output_dir={tmp_path}", "eval.limit=3"])
    assert fingerprint(a, "cpt") == fingerprint(b, "cpt") and fingerprint(a, "eval") != fingerprint(b, "eval")
    c = resolve_spec(smoke, [f"output_dir={tmp_path}", "lora.rank=4"])
    assert fingerprint(a, "cpt") != fingerprint(c, "cpt") and fingerprint(a, "eval") != fingerprint(c, "eval")


def test_presets_by_name_and_the_bundled_files_they_name(tmp_path):
    assert preset_path("smoke").name == "smoke.yaml" and preset_path("smoke.yaml") == preset_path("smoke")
    with pytest.raises(SpecError, match="'nope' is neither a file nor a bundled preset \\(bundled: qwen25_500m_ja, smoke\\)"):
        preset_path("nope")
    spec = resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}"])
    for source in (*spec.cpt.data.blend[0].source, *spec.sft.data.sft_source, *spec.cpt.data.val_ja_source):
        with open(source, encoding="utf-8") as handle:  # {repo}/data/... resolves to the bundled samples
            assert json.loads(handle.readline())


def test_sft_without_an_export_stage_starts_from_what_cpt_training_wrote(tmp_path):
    spec = resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", "stages=[import,data,cpt,sft]"])
    with pytest.raises(MissingRecord, match="sft starts from cpt's merged model, .* add the export stage"):
        layout.stage_start_hf(spec, "sft")
    merged = layout.hf_merged(spec, "cpt")
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")  # the hf backend's training writes hf_merged/ itself
    assert layout.stage_start_hf(spec, "sft") == str(merged.resolve())
