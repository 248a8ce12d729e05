"""`jp-peft wandb workspace RUN_DIR...`: a saved W&B workspace for one experiment (its W&B group), built with
wandb-workspaces, so nobody builds the dashboard by hand.

Sections: JA and EN validation loss against consumed tokens (one line per swept value and stage), JA gain
against EN forgetting per run (perplexity, then task points), the downstream task tables with the JA/EN
averages, throughput, MFU and learning rate. The runs are grouped by the swept field(s), then by stage, and
coloured by the swept value. The metric keys are the ones the runs log (records.metrics: training and
validation rows; evaluation.wandb_log: the eval run); project, entity and group are the runs' W&B identity
(training.wandb_run.run_identity). Offline the workspace is written as the library's own model (its View,
JSON) to a file; with a key it is saved to W&B and its URL printed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from jp_peft.compare import config_differences, flatten_config
from jp_peft.evaluation.summary import BASE
from jp_peft.evaluation.wandb_log import summary_key, table_key
from jp_peft.records import layout as rundir
from jp_peft.records.layout import MissingRecord
from jp_peft.records.metrics import (CONSUMED_TOKENS, EN_PPL_FORGETTING, JA_PPL_GAIN, LEARNING_RATE, MFU, STEP,
                                     TFLOPS_PER_S, TOKENS_PER_S, val_loss_key)
from jp_peft.spec import TRAINED_STAGES, ExperimentSpec, SpecError, read_spec_file
from jp_peft.training.wandb_run import run_identity, run_ids

# matplotlib's tab10: the colour of each swept value, in the order the runs are given
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
STAGE_GROUP = "JobType"  # W&B's run attribute that run_identity sets to the stage
SECTIONS = ("Validation loss vs consumed tokens", "JA gain vs EN forgetting", "Downstream tasks",
            "Throughput, MFU, learning rate")


@dataclass(frozen=True)
class ExperimentRun:
    dir: Path
    spec: ExperimentSpec
    wandb_ids: tuple[str, ...]  # its stages' W&B runs


def load_runs(run_dirs: list[str]) -> list[ExperimentRun]:
    """The runs, each with its spec and W&B run ids; refuses a missing directory, a run without W&B and runs of
    different experiments (MissingRecord or SpecError, naming the path or the field)."""
    runs = []
    for name in dict.fromkeys(run_dirs):
        run_dir = Path(name)
        if not run_dir.is_dir():
            raise MissingRecord(f"{run_dir}: no such run directory")
        spec_path = rundir.spec_file_of(run_dir)
        if not spec_path.is_file():
            raise MissingRecord(f"{run_dir}: no spec.json; is this a run directory (DIR/NAME)?")
        spec = read_spec_file(spec_path)
        if not spec.wandb.enabled:
            raise SpecError(f"{spec_path}: wandb.enabled is false: the run logged nothing to W&B")
        ids = run_ids(run_dir)
        if not ids:
            raise MissingRecord(f"{run_dir / 'wandb'}: no W&B runs (offline-run-* or run-*); was it run with "
                                "--no-wandb, or has no stage finished?")
        runs.append(ExperimentRun(run_dir, spec, tuple(ids)))
    first = run_identity(runs[0].spec, TRAINED_STAGES[0])
    for run in runs[1:]:
        identity = run_identity(run.spec, TRAINED_STAGES[0])
        for field, key in (("wandb.project", "project"), ("wandb.entity", "entity"), ("group", "group")):
            if identity[key] != first[key]:
                raise SpecError(f"{rundir.spec_file_of(run.dir)}: {field} is {identity[key]!r}, not {first[key]!r} "
                                f"as in {runs[0].dir}: a workspace shows one experiment (one W&B group)")
    return runs


def _flat(spec: ExperimentSpec) -> dict:
    return flatten_config(spec.to_dict())


def swept_fields(runs: list[ExperimentRun]) -> list[str]:
    """The spec fields the sweep varied: of the fields that differ between the runs, those each run's name
    carries (a sweep names its variants GROUP-FIELDVALUE, spec.resolve.variant_suffix); derived fields that
    follow (a replay ratio's blend weights) and the tags are not in the names."""
    differing = config_differences([{"spec": r.spec.to_dict()} for r in runs])
    suffixes = [r.spec.name.removeprefix(f"{r.spec.group_name}-") for r in runs]
    return [key for key in differing if "[" not in key
            and all(re.search(rf"(?:^|-){re.escape(key.split('.')[-1])}", s) for s in suffixes)]


def check_field(runs: list[ExperimentRun], field: str) -> None:
    if field not in _flat(runs[0].spec) or "[" in field:
        raise SpecError(f"--group-by {field}: not a spec field (`jp-peft spec fields` lists them)")


def config_key(field: str) -> str:
    """The W&B config path of a spec field: run_identity logs the resolved spec under `spec`."""
    return f"spec.{field}"


def group_label(value) -> str:
    """A config value as W&B's app names its group (JavaScript's String(value)): 0.0 -> "0", True -> "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None:
        return "null"
    return value if isinstance(value, str) else json.dumps(value)


def models_of(runs: list[ExperimentRun]) -> list[str]:
    """The eval stage's models: the base and every trained stage of the runs, in stage order."""
    return [BASE, *[s for s in TRAINED_STAGES if any(s in r.spec.trained_stages for r in runs)]]


def build_workspace(runs: list[ExperimentRun], group_by: list[str], entity: str):
    """The wandb_workspaces Workspace of the experiment (nothing is sent anywhere)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    identity = run_identity(runs[0].spec, TRAINED_STAGES[0])
    trained = [m for m in models_of(runs) if m != BASE]
    values = [tuple(_flat(r.spec)[f] for f in group_by) for r in runs]
    colour_of = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(dict.fromkeys(values))}
    swept = ", ".join(group_by) or "run"

    def line(title: str, y: list[str], x: str = STEP, **kwargs):
        return wr.LinePlot(title=title, x=x, y=y, title_x=x, **kwargs)

    validation = [line(f"{lang.upper()} validation loss (per swept value and stage)", [val_loss_key(lang)],
                       x=CONSUMED_TOKENS) for lang in ("ja", "en")]
    gain_forgetting = [wr.ScatterPlot(title="JA perplexity gain vs EN forgetting (fractions of each stage's start)",
                                      x=wr.SummaryMetric(EN_PPL_FORGETTING), y=wr.SummaryMetric(JA_PPL_GAIN))]
    gain_forgetting += [wr.ScatterPlot(title=f"{stage}: JA task gain vs EN forgetting (points against base)",
                                       x=wr.SummaryMetric(summary_key(stage, "en_forgetting")),
                                       y=wr.SummaryMetric(summary_key(stage, "ja_gain"))) for stage in trained]
    downstream = [wr.BarPlot(title=f"{lang.upper()} task average (points)", orientation="v",
                             metrics=[summary_key(m, f"{lang}_avg") for m in models_of(runs)]) for lang in ("ja", "en")]
    downstream += [wr.WeavePanelSummaryTable(table_name=table_key(m)) for m in models_of(runs)]
    throughput = [line("tokens/s", [TOKENS_PER_S]), line("MFU (GPU runs: the device's peak is known)", [MFU]),
                  line("TFLOP/s", [TFLOPS_PER_S]), line("learning rate", [LEARNING_RATE])]

    return ws.Workspace(
        entity=entity, project=identity["project"], name=f"jp-peft {identity['group']} by {swept}",
        sections=[ws.Section(name=name, panels=panels, is_open=True)
                  for name, panels in zip(SECTIONS, (validation, gain_forgetting, downstream, throughput))],
        runset_settings=ws.RunsetSettings(
            filters=[ws.Metric("Group") == identity["group"]],
            groupby=[*(ws.Config(config_key(f)) for f in group_by), ws.Metric(STAGE_GROUP)],
            group_colors={group_label(v[0]): colour_of[v] for v in colour_of} if len(group_by) == 1 else {},
            run_settings={run_id: ws.RunSettings(color=colour_of[v]) for r, v in zip(runs, values)
                          for run_id in r.wandb_ids}),
    )


def workspace_json(workspace) -> str:
    """The workspace as the library's own model: its View (entity, project, names and the spec it saves)."""
    return workspace._to_model().model_dump_json(by_alias=True, exclude_none=True, indent=2)


def load_workspace(text: str):
    """A written definition back as a wandb_workspaces Workspace (validated by the library's models)."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    return ws.Workspace._from_model(internal.View.model_validate_json(text))


def workspace_command(run_dirs: list[str], output: str | None, group_by: list[str]) -> int:
    """Build the workspace; offline write its definition (default: the group directory's wandb_workspace.json),
    online save it and print its URL. Bad input: one line on stderr, exit 2."""
    import sys

    from jp_peft.training.wandb_run import wandb_mode

    try:
        runs = load_runs(run_dirs)
        for field in group_by:
            check_field(runs, field)
        group_by = group_by or swept_fields(runs)
    except (MissingRecord, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    online = wandb_mode() == "online"
    entity = run_identity(runs[0].spec, TRAINED_STAGES[0])["entity"]
    if entity is None and online:
        import wandb

        entity = wandb.Api().default_entity  # the key's default, as wandb.init uses it
    workspace = build_workspace(runs, group_by, entity or "")
    print(f"workspace {workspace.name!r}: {len(runs)} runs of group {runs[0].spec.group_name!r}, grouped by "
          f"{', '.join(group_by) or 'stage only (no swept field found; --group-by FIELD names one)'}")
    if online:
        workspace.save()
        print(f"saved: {workspace.url}")
        return 0
    path = Path(output) if output else rundir.wandb_workspace_file(runs[0].dir.parent / runs[0].spec.group_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(workspace_json(workspace) + "\n", encoding="utf-8")
    print(f"offline (no WANDB_API_KEY, or WANDB_MODE={wandb_mode()}): wrote the workspace definition to {path}"
          + ("" if entity else "; its entity is empty (wandb.entity unset: the key's default when saved)"))
    return 0
