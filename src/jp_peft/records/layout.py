"""The run directory: where every stage reads and writes, for both backends. The one owner of the layout.

    OUTPUT_DIR/GROUP/import/base.json                the base model (HF dir, tokenizer, NeMo checkpoint)
    OUTPUT_DIR/GROUP/data/prepared.json              what the data stage prepared
    OUTPUT_DIR/GROUP/launches/                       NeMo-Run experiment dirs (task logs)
    OUTPUT_DIR/GROUP/wandb_workspace.json            the W&B workspace definition (`jp-peft wandb workspace`, offline)
    OUTPUT_DIR/NAME/spec.json                        the resolved spec of the run
    OUTPUT_DIR/NAME/.jp-peft.lock                    held by the launch using the run (also in GROUP/)
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/metrics.json       the stage's metrics record (jp_peft.records.metrics)
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/train_log.jsonl    per-step and per-validation rows
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/val_baseline.json  the starting model's held-out losses (Megatron, dpo)
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/checkpoints/       trainer checkpoints (resume; dpo: the HF Trainer's checkpoint-N/)
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/nemo/              NeMo's log directory, checkpoints/ inside
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/hf_adapter/        PEFT adapter (methods lora, lora_embed; none under full)
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/hf_merged/         merged Hugging Face model + tokenizer
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/model.nemo         merged NeMo checkpoint, one file (Megatron backend)
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/trained_logits.pt  the trained model's logits on held-out ids (hf; export checks)
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/export.json        the export record: artifacts and parity checks
    OUTPUT_DIR/NAME/{cpt,sft,dpo}/gguf/              llama.cpp GGUF files (`jp-peft export gguf`)
    OUTPUT_DIR/NAME/eval/results.json                downstream task scores of base and every trained stage
    OUTPUT_DIR/NAME/eval/samples.jsonl               greedy answers of base and every trained stage
    OUTPUT_DIR/NAME/summary.json                     the table printed at the end
    OUTPUT_DIR/NAME/wandb/                           W&B's folders of the stages' runs (training.wandb_run)

GROUP is the sweep's group (NAME for a single run): the stages a sweep shares write there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jp_peft.spec import ExperimentSpec
from jp_peft.spec.stages import DATA, EVAL, EXPORT, IMPORT, TRAIN, previous_trained, stage as stage_row


LOCK_NAME = ".jp-peft.lock"


class MissingRecord(FileNotFoundError):
    """A stage needs a record that the stage writing it has not written (yet)."""


def write_json(path: Path, obj: Any) -> None:
    """Written aside and renamed into place: a reader sees the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, needed_by: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise MissingRecord(f"{needed_by}: {path} not found; did the stage that writes it finish?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MissingRecord(f"{needed_by}: {path} is not valid JSON ({exc}); rerun the stage that writes it") from None


def import_record(spec: ExperimentSpec) -> Path:
    return spec.group_dir / "import" / "base.json"


def data_record(spec: ExperimentSpec) -> Path:
    return spec.group_dir / "data" / "prepared.json"


def index_cache(spec: ExperimentSpec) -> Path:
    """Megatron's sample-index cache of the shared data (one per group)."""
    return spec.group_dir / "data" / "index_cache"


def launches_dir(spec: ExperimentSpec) -> Path:
    # Not ".../nemo_run": NeMo-Run rewrites every "/nemo_run" in a bare-metal sbatch script to the job dir.
    return spec.group_dir / "launches"


def lock_file(directory: Path) -> Path:
    """Held (fcntl) by the launch using a run or group directory; holds who that is."""
    return Path(directory) / LOCK_NAME


def jobs_file(directory: Path) -> Path:
    """Slurm job ids of the last launch into a directory (a new launch waits for them)."""
    return Path(directory) / ".jp-peft.jobs.json"


def spec_file(spec: ExperimentSpec) -> Path:
    return spec_file_of(spec.run_dir)


def spec_file_of(run_dir: Path) -> Path:
    return Path(run_dir) / "spec.json"


def stage_dir(spec: ExperimentSpec, stage: str) -> Path:
    return stage_dir_of(spec.run_dir, stage)


def stage_dir_of(run_dir: Path, stage: str) -> Path:
    """A stage's directory in a run directory (`jp-peft compare` and `status` have directories, not specs)."""
    return Path(run_dir) / stage


def metrics_file(spec: ExperimentSpec, stage: str) -> Path:
    return metrics_file_of(spec.run_dir, stage)


def metrics_file_of(run_dir: Path, stage: str) -> Path:
    return stage_dir_of(run_dir, stage) / "metrics.json"


def train_log(spec: ExperimentSpec, stage: str) -> Path:
    return train_log_of(spec.run_dir, stage)


def train_log_of(run_dir: Path, stage: str) -> Path:
    return stage_dir_of(run_dir, stage) / "train_log.jsonl"


def wandb_workspace_file(group_dir: Path) -> Path:
    """`jp-peft wandb workspace`'s offline output: the experiment's W&B workspace definition."""
    return Path(group_dir) / "wandb_workspace.json"


def wandb_run_id_file(spec: ExperimentSpec, stage: str) -> Path:
    """The W&B run id a stage logs to, kept so that a resumed stage continues the same run."""
    return stage_dir(spec, stage) / "wandb_run_id.txt"


def val_baseline(spec: ExperimentSpec, stage: str) -> Path:
    """The starting model's held-out losses, measured before the first step (a resumed run reuses them)."""
    return stage_dir(spec, stage) / "val_baseline.json"


def nemo_log_dir(spec: ExperimentSpec, stage: str) -> Path:
    """NeMoLogger's directory of a Megatron stage. Its own: on every resume NeMo moves each file it finds
    there into run_N/ (nemo_logger.py _setup_files_to_move), which must not take jp-peft's records along."""
    return stage_dir(spec, stage) / "nemo"


def nemo_checkpoints(spec: ExperimentSpec, stage: str) -> Path:
    """A Megatron stage's checkpoints: NeMo keeps them in its log directory."""
    return nemo_log_dir(spec, stage) / "checkpoints"


def trainer_checkpoints(spec: ExperimentSpec, stage: str) -> Path:
    """A trainer's checkpoints (hf backend): Lightning's last.ckpt and step=N.ckpt; the dpo stage's Hugging Face
    Trainer (TRL) writes checkpoint-N/ directories here (backends/hf/dpo.last_checkpoint finds the newest)."""
    return stage_dir(spec, stage) / "checkpoints"


def trainer_last_checkpoint(spec: ExperimentSpec, stage: str) -> Path:
    """What a resumed hf stage continues from (saved every N steps and when the stage is stopped)."""
    return trainer_checkpoints(spec, stage) / "last.ckpt"


def hf_adapter(spec: ExperimentSpec, stage: str) -> Path:
    return stage_dir(spec, stage) / "hf_adapter"


def hf_merged(spec: ExperimentSpec, stage: str) -> Path:
    return stage_dir(spec, stage) / "hf_merged"


def trained_logits(spec: ExperimentSpec, stage: str) -> Path:
    return stage_dir(spec, stage) / "trained_logits.pt"


def nemo_merged(spec: ExperimentSpec, stage: str) -> Path:
    """The merged NeMo checkpoint directory (SFT on Megatron restores from the CPT one)."""
    return stage_dir(spec, stage) / "nemo_merged"


def nemo_archive(spec: ExperimentSpec, stage: str) -> Path:
    return stage_dir(spec, stage) / "model.nemo"


def gguf_dir(spec: ExperimentSpec, stage: str) -> Path:
    """`jp-peft export gguf`: model-<type>.gguf, and for a lora adapter base-f16.gguf + lora-f16.gguf."""
    return stage_dir(spec, stage) / "gguf"


def export_record(spec: ExperimentSpec, stage: str) -> Path:
    return stage_dir(spec, stage) / "export.json"


def eval_dir(spec: ExperimentSpec) -> Path:
    return spec.run_dir / "eval"


def eval_results(spec: ExperimentSpec) -> Path:
    return eval_results_of(spec.run_dir)


def eval_results_of(run_dir: Path) -> Path:
    """results.json of a run directory (`jp-peft compare` has directories, not specs)."""
    return Path(run_dir) / "eval" / "results.json"


def eval_samples(spec: ExperimentSpec) -> Path:
    return eval_dir(spec) / "samples.jsonl"


def summary_file(spec: ExperimentSpec) -> Path:
    return spec.run_dir / "summary.json"


def stage_record(spec: ExperimentSpec, stage: str, target: str | None = None) -> Path:
    """The file a stage writes last: its presence is the launcher's proof that the stage finished."""
    kind = stage_row(stage).kind
    if kind == IMPORT:
        return import_record(spec)
    if kind == DATA:
        return data_record(spec)
    if kind == EXPORT:
        return export_record(spec, target)
    if kind == EVAL:
        return summary_file(spec)
    assert kind == TRAIN, kind
    return metrics_file(spec, stage)


def base_model_dir(spec: ExperimentSpec) -> str:
    """The Hugging Face directory of the base model (tokenizer included), from the import record."""
    return read_json(import_record(spec), "base model")["base_dir"]


def stage_start_hf(spec: ExperimentSpec, stage: str) -> str:
    """The Hugging Face model a trained stage starts from: the base, or the merged model of the trained stage
    it follows (the stage table's starts_from: SFT after CPT). Exported adapters name it as their base, and
    before/after perplexities compare to it."""
    previous = previous_trained(stage, spec.stages)
    if previous is None:
        return base_model_dir(spec)
    if spec.exports:  # the checked export, when the run exports
        read_json(export_record(spec, previous), f"{stage} starts from the exported {previous} result")
    elif not (hf_merged(spec, previous) / "config.json").exists():  # else what training itself wrote (hf)
        raise MissingRecord(f"{stage} starts from {previous}'s merged model, {hf_merged(spec, previous)}, which is not "
                            "there: add the export stage to the stages")
    return str(hf_merged(spec, previous).resolve())
