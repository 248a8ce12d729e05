"""Runs `jp-peft data prepare`: plans the shards, continues from a work directory an interrupted run
left, runs the pipeline's stages on the datatrove engine, keeps or removes the work directory on each
way out, and returns the report. The record-level rules are in `prepare` (validation, cleaning,
filters, the report), the stages in `pipeline`, the executors in `engine`: this module only sequences
them, so that none of those three imports another one back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jp_peft.data import engine, pipeline
from jp_peft.data import prepare as prep
from jp_peft.data.errors import ConfigError, InputFileError, NothingKeptError, StrictModeError
from jp_peft.data.prepare import PrepareConfig
from jp_peft.data.workdir import WorkDir


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the pipeline; returns the report (also written to PREFIX.report.json)."""
    tok = prep.load_tokenizer(cfg)
    started = time.time()
    workers = prep.planned_workers(cfg)
    work = WorkDir(cfg.work)
    with prep.sigterm_raises():
        plan = pipeline.make_plan(cfg, workers, prep.default_tasks(cfg, workers), prep.special_tokens(tok), started)
        if why := work.open_for(pipeline.fingerprint(plan)):
            prep.note(f"{work}: {why}: starting afresh")
        if resumed := pipeline.record_resume(work, plan):
            prep.note(f"continuing from {work}: {resumed}")
        pipeline.preload(cfg, tok)  # forked local tasks inherit it
        try:
            engine.run_stages(pipeline.stages(plan, work), plan, work)
        except (StrictModeError, InputFileError, ConfigError, NothingKeptError):
            work.remove()  # the same input would fail the same way: nothing to continue from
            raise
        except engine.SlurmTaskError:
            prep.note(f"kept {work} (the tasks' logs, and the shards they finished: rerun the same command to continue)")
            raise
        except BaseException:
            if finished := work.completed("clean"):
                prep.note(f"kept {work}: {len(finished)} of {plan.tasks} shards were cleaned; rerun the same command "
                                 "to continue from them")
            else:
                work.remove()
            raise
        report = json.loads(Path(cfg.output_prefix + ".report.json").read_text(encoding="utf-8"))
        if not cfg.keep_work_dir:
            work.remove()
        return report
