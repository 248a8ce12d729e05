"""The progress line the launcher, `--wait` and `jp-peft status` show, read from a stage's train_log.jsonl."""

import json
import os

import pytest

from jp_peft.records.progress import latest_progress


def _row(step, loss, tps, secs):
    return json.dumps({"trainer/global_step": step, "train/loss": loss, "perf/tokens_per_s": tps,
                       "perf/step_time_s": secs})


@pytest.mark.unit
def test_newest_row_with_eta_from_recent_step_times_and_a_half_written_line_ignored(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [_row(s, 7.0 - s / 10, 1000.0, 2.0) for s in range(1, 11)] + [json.dumps({"val/ja_loss": 6.9})]
    log.write_text("\n".join(rows) + '\n{"trainer/global_step": 11, "train/lo')  # a row being written
    step, line = latest_progress(log, "cpt", 40)
    assert step == 10
    assert line == "[jp-peft] cpt step 10/40 loss 6.0000 1,000 tok/s ETA 0:01:00"  # 30 steps x 2 s


@pytest.mark.unit
def test_no_line_before_the_first_step_or_from_an_earlier_attempt(tmp_path):
    log = tmp_path / "train_log.jsonl"
    assert latest_progress(log, "cpt", 40) is None  # not there yet
    log.write_text(json.dumps({"val/ja_loss": 6.9}) + "\n")
    assert latest_progress(log, "cpt", 40) is None  # validation only
    log.write_text(_row(5, 6.5, 900.0, 1.0) + "\n")
    os.utime(log, (1000, 1000))
    assert latest_progress(log, "cpt", 40, since=2000) is None  # older than this launch
    assert latest_progress(log, "cpt", 40, since=0)[0] == 5
