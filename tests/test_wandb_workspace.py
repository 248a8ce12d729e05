"""`jp-peft wandb workspace`: the written definition loads back into wandb-workspaces' own model, with the
sections and panels on the metric keys the runs log, grouped and coloured by the swept field; bad input
exits 2 with one line. The runs are the smoke preset's replay sweep as `jp-peft run --sweep` plans it
(spec.json only, nothing trained) with a real offline W&B run each, made with the runs' own identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.evaluation.wandb_log import summary_key, table_key
from jp_peft.records import layout
from jp_peft.records.metrics import (CONSUMED_TOKENS, EN_PPL_FORGETTING, JA_PPL_GAIN, LEARNING_RATE, MFU,
                                     TOKENS_PER_S, val_loss_key)
from jp_peft.spec import load_preset
from jp_peft.training.wandb_run import run_ids, wandb_stage_run
from jp_peft.wandb_workspace import SECTIONS, load_workspace

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "jp_peft.cli", "wandb", "workspace", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, monkeypatch_module) -> list[Path]:
    """Two runs of `--smoke --sweep cpt.data.replay_ratio=0,0.3`, each with its spec.json and one offline W&B
    run (the cpt stage's identity)."""
    from jp_peft.run.plan import plan

    out = tmp_path_factory.mktemp("runs")
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.delenv("WANDB_API_KEY", raising=False)
    tasks = plan(load_preset("smoke"), [f"output_dir={out}", "backend=hf"], ["cpt.data.replay_ratio=0,0.3"],
                 dryrun=True)
    specs = list({t.spec.name: t.spec for t in tasks if t.spec.name != t.spec.group_name}.values())
    assert [s.name for s in specs] == ["smoke-replay_ratio0", "smoke-replay_ratio0.3"]
    for spec in specs:
        spec.run_dir.mkdir(parents=True)
        layout.spec_file(spec).write_text(json.dumps(spec.to_dict()))
        run = wandb_stage_run(spec, "cpt")
        run.log({"perf/consumed_tokens": 2048, "val/ja_loss": 6.6})
        run.finish()
    return [s.run_dir for s in specs]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def written(sweep) -> tuple[Path, subprocess.CompletedProcess]:
    result = _cli(*map(str, sweep), cwd=sweep[0].parent)
    return layout.wandb_workspace_file(sweep[0].parent / "smoke"), result


def test_offline_writes_the_definition_the_library_loads_back(written):
    path, result = written
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout and "offline" in result.stdout
    workspace = load_workspace(path.read_text())  # the library's View model, then its Workspace
    assert workspace.project == "jp-peft" and workspace.entity == ""  # the smoke spec's wandb section
    assert [s.name for s in workspace.sections] == list(SECTIONS)


def _names(metrics) -> list[str]:
    """Loaded back, a panel's metrics are the library's Metric objects."""
    return [getattr(m, "name", m) for m in metrics]


def test_panels_plot_the_keys_the_runs_log(written):
    import wandb_workspaces.reports.v2 as wr

    workspace = load_workspace(written[0].read_text())
    panels = {s.name: s.panels for s in workspace.sections}
    validation = panels["Validation loss vs consumed tokens"]
    assert [(_names([p.x])[0], _names(p.y)) for p in validation] == [(CONSUMED_TOKENS, [val_loss_key("ja")]),
                                                (CONSUMED_TOKENS, [val_loss_key("en")])]
    scatter = [(p.x.name, p.y.name) for p in panels["JA gain vs EN forgetting"]]
    assert scatter == [(EN_PPL_FORGETTING, JA_PPL_GAIN)] + [
        (summary_key(m, "en_forgetting"), summary_key(m, "ja_gain")) for m in ("cpt", "sft")]
    downstream = panels["Downstream tasks"]
    assert [_names(p.metrics) for p in downstream if isinstance(p, wr.BarPlot)] == [
        [summary_key(m, f"{lang}_avg") for m in ("base", "cpt", "sft")] for lang in ("ja", "en")]
    assert [p.table_name for p in downstream if isinstance(p, wr.WeavePanelSummaryTable)] == [
        table_key(m) for m in ("base", "cpt", "sft")]
    assert [_names(p.y) for p in panels["Throughput, MFU, learning rate"]] == [[TOKENS_PER_S], [MFU], ["perf/tflops_per_s"],
                                                                        [LEARNING_RATE]]


def test_runs_grouped_and_coloured_by_the_swept_field(written, sweep):
    workspace = load_workspace(written[0].read_text())
    settings = workspace.runset_settings
    assert [g.name for g in settings.groupby] == ["spec.cpt.data.replay_ratio", "JobType"]
    assert "smoke" in settings.filters and "group" in settings.filters.lower()
    colours = {run_dir.name: {settings.run_settings[i].color for i in run_ids(run_dir)} for run_dir in sweep}
    assert all(len(c) == 1 for c in colours.values()) and colours[sweep[0].name] != colours[sweep[1].name]
    assert set(settings.group_colors) == {"0", "0.3"}
    assert settings.group_colors["0.3"] == next(iter(colours[sweep[1].name]))


def test_bad_input_exits_2_with_one_line(sweep, tmp_path):
    missing = _cli(str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and str(tmp_path / "nope") in missing.stderr
    assert "Traceback" not in missing.stderr

    no_wandb = tmp_path / "runs" / "quiet"
    no_wandb.mkdir(parents=True)
    spec = json.loads(layout.spec_file_of(sweep[0]).read_text())
    spec.update(name="quiet", output_dir=str(tmp_path / "runs"), wandb={**spec["wandb"], "enabled": False})
    layout.spec_file_of(no_wandb).write_text(json.dumps(spec))
    result = _cli(str(no_wandb), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "wandb.enabled" in result.stderr
    assert "Traceback" not in result.stderr

    unknown = _cli(*map(str, sweep), "--group-by", "lora.nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "lora.nope" in unknown.stderr and "Traceback" not in unknown.stderr
