"""W&B run identity for a stage: comparable across runs, offline unless a key is present.

group = experiment (sweep) name, job_type = stage, name = stage:variant, tags from the spec,
the whole resolved spec as nested config, plus git commit and dirty flag. The step axis is
`trainer/global_step` (Lightning's WandbLogger defines it as every metric's step metric).
The API key is read by wandb from the environment and never copied anywhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

from jp_peft.records import layout
from jp_peft.resources import checkout_root
from jp_peft.spec import ExperimentSpec


def git_state() -> dict:
    """The commit jp-peft runs from and whether its checkout has changes (None, None for an installed wheel)."""
    root = checkout_root()

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD") if root is not None else ""
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain")) if commit else None}


def run_identity(exp: ExperimentSpec, stage: str) -> dict:
    """The W&B identity of a stage's run, the same on every backend and for every stage: group = the experiment
    (sweep), job_type = the stage, name = stage:run, tags = the spec's + stage + backend, and the resolved spec,
    the git state and the backend as config. The keyword names are wandb.init's (WandbLogger passes them on)."""
    return {"project": exp.wandb.project, "entity": exp.wandb.entity, "group": exp.group_name, "job_type": stage,
            "name": f"{stage}:{exp.name}", "tags": [*exp.wandb.tags, stage, exp.backend],
            "config": {"spec": exp.to_dict(), "stage": stage, "git": git_state(), "backend": exp.backend}}


def wandb_mode() -> str:
    """'disabled', 'online' (a key is set) or 'offline' (the default: sync later with `jp-peft wandb sync`)."""
    requested = os.environ.get("WANDB_MODE", "")
    if requested in ("disabled", "offline"):
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_logger(exp: ExperimentSpec, stage: str, resuming: bool):
    """Lightning's WandbLogger with the stage's identity; `resuming` (the stage continues from a checkpoint)
    continues the W&B run it logged to before."""
    if not exp.wandb.enabled or wandb_mode() == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    id_file = layout.wandb_run_id_file(exp, stage)
    resuming = resuming and id_file.exists()
    run_id = id_file.read_text().strip() if resuming else f"{exp.name}-{stage}-{uuid.uuid4().hex[:8]}"
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(**run_identity(exp, stage), save_dir=str(exp.run_dir), offline=wandb_mode() == "offline",
                       id=run_id, resume="allow")


def wandb_stage_run(exp: ExperimentSpec, stage: str):
    """A plain W&B run with a training stage's identity (group, job_type = stage, name, tags, config), for
    stages that do not train through Lightning (eval); None when W&B is off."""
    if not exp.wandb.enabled or wandb_mode() == "disabled":
        return None
    import wandb

    exp.run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(**run_identity(exp, stage), dir=str(exp.run_dir), mode=wandb_mode(),
                      id=f"{exp.name}-{stage}-{uuid.uuid4().hex[:8]}", settings=wandb.Settings(console="off"))


def log_adapter_artifact(logger, exp: ExperimentSpec, stage: str, adapter_dir: Path, metrics: dict) -> None:
    import wandb

    metadata = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and v is not None}
    artifact = wandb.Artifact(name=f"{exp.name}-{stage}-adapter", type="lora-adapter", metadata=metadata)
    artifact.add_dir(str(adapter_dir))
    logger.experiment.log_artifact(artifact)


def offline_runs(directory: str) -> list[Path]:
    """The offline W&B run directories (offline-run-*) anywhere under `directory`, sorted: what sync uploads."""
    return sorted(p for p in Path(directory).rglob("offline-run-*") if p.is_dir())


def run_ids(run_dir: Path) -> list[str]:
    """The ids of the W&B runs a run directory logged (its wandb/ folder: `offline-run-DATE_TIME-ID` or, logged
    online, `run-DATE_TIME-ID`), in the order they ran."""
    pattern = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-(.+)")
    found = [(p.name, m.group(1)) for p in (Path(run_dir) / "wandb").glob("*run-*")
             if p.is_dir() and not p.is_symlink() and (m := pattern.fullmatch(p.name))]
    return [run_id for _, run_id in sorted(found, key=lambda f: f[0].removeprefix("offline-"))]


def sync_offline_runs(directory: str) -> int:
    """Upload every offline run under `directory` with `wandb sync` (the key comes from the environment)."""
    import shutil
    import subprocess
    import sys

    runs = offline_runs(directory)
    if not runs:
        print(f"error: no offline W&B runs under {directory}", file=sys.stderr)
        return 2
    if not os.environ.get("WANDB_API_KEY"):
        print("error: WANDB_API_KEY is not set; export it (or run `wandb login`) and retry", file=sys.stderr)
        return 2
    wandb_cli = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    failed = 0
    for run in runs:
        print(f"syncing {run}", flush=True)
        failed += subprocess.run([wandb_cli, "sync", str(run)]).returncode != 0
    return 1 if failed else 0
