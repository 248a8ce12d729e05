"""`jp-peft data prepare --executor slurm` on the real dev cluster (slurm/local/): one array job
per stage, the same outputs and report as the local executor, a task that dies resubmitted and said so
in the report, a task that keeps dying failing the command with its log, an unreadable input failing as
it does locally."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm
# Run-specific fields of the report: everything else must be equal between executors.
RUN_FIELDS = {"seconds", "docs_per_second", "mb_per_second", "workers", "executor", "task_seconds", "outputs",
              "retried", "config"}
RUN_CONFIG = {"output_prefix", "workers", "progress", "progress_interval", "executor", "slurm_profile", "work_dir",
              "keep_work_dir"}
# Fault injection from outside the code under test: Python runs sitecustomize at every start, also in the
# array tasks (which inherit PYTHONPATH); it kills chosen clean tasks the way the OOM killer would.
KILLER = """import os, pathlib
if os.environ.get("SLURM_JOB_NAME") == "jp-peft.prepare.clean":
    marker = pathlib.Path(os.environ["JP_PEFT_TEST_MARKER"])
    if os.environ.get("JP_PEFT_TEST_KILL") == "always" or (
            os.environ.get("SLURM_ARRAY_TASK_ID") == "1" and not marker.exists()):
        marker.touch()
        os._exit(137)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Kept, rejected and duplicate records, the duplicates in other shards than their originals."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = random.Random(0)
    alphabet = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめも日本語東京大阪会社学校先生電車新聞天気"
    texts = [f"{i}番目。" + "".join(rng.choice(alphabet) for _ in range(200)) for i in range(240)]
    rows = [{"text": t} for t in texts] + [{"text": "English only."}, {"body": "no text"}, {"text": "短い"}]
    rows += [{"text": texts[i]} for i in (3, 50, 120)] + [{"text": texts[7][:100] + "★" + texts[7][101:]}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(corpus, tiny_base, prefix, *extra, env=None):
    cmd = [sys.executable, "-m", "jp_peft.cli", "data", "prepare", "--input", str(corpus), "--tokenizer",
           str(tiny_base), "--output-prefix", str(prefix), "--tasks", "4", "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)


def same_run(a: Path, b: Path) -> None:
    """The same kept documents, rejects and report."""
    for ext in ("_text_document.bin", "_text_document.idx", ".rejected.jsonl"):
        assert Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes(), ext
    ra, rb = (json.loads(Path(f"{p}.report.json").read_text()) for p in (a, b))
    assert {k: v for k, v in ra.items() if k not in RUN_FIELDS} == {k: v for k, v in rb.items() if k not in RUN_FIELDS}
    assert ({k: v for k, v in ra["config"].items() if k not in RUN_CONFIG}
            == {k: v for k, v in rb["config"].items() if k not in RUN_CONFIG})


@pytest.fixture(scope="module")
def local_run(corpus, tiny_base, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("local") / "out"
    proc = prepare(corpus, tiny_base, prefix, "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return prefix


def test_slurm_and_local_executors_give_the_same_outputs_and_report(cluster, corpus, tiny_base, local_run, tmp_path):
    proc = prepare(corpus, tiny_base, tmp_path / "out", "--executor", "slurm", "--slurm-profile", "local")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["executor"] == "slurm" and report["tasks"] == 4 and report["retried"] == {}
    assert report["read"] == report["kept"] + report["rejected_total"] == 247
    assert report["rejected"]["exact_duplicate"] == 3 and report["rejected"]["near_duplicate"] == 1
    same_run(tmp_path / "out", local_run)
    assert not (tmp_path / "out.work").exists()  # the work directory is removed after success


def test_a_slurm_task_that_dies_is_resubmitted_and_the_report_says_so(cluster, corpus, tiny_base, local_run,
                                                                      tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
           "JP_PEFT_TEST_MARKER": str(tmp_path / "killed-once")}
    proc = prepare(corpus, tiny_base, tmp_path / "out", "--executor", "slurm", "--slurm-profile", "local", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "killed-once").exists() and "resubmitting them once" in proc.stderr
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["retried"] == {"clean": [1]}  # only the task that died; the later stages had not started
    assert "resubmitted after a failure" in proc.stdout
    same_run(tmp_path / "out", local_run)


def test_a_slurm_task_that_keeps_dying_fails_the_command_with_its_log(cluster, corpus, tiny_base, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
           "JP_PEFT_TEST_MARKER": str(tmp_path / "killed"), "JP_PEFT_TEST_KILL": "always"}
    proc = prepare(corpus, tiny_base, tmp_path / "out", "--executor", "slurm", "--slurm-profile", "local", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "of stage clean did not finish after 1 resubmission" in message, proc.stderr
    log = Path(message.split("its log: ")[1].split(" (and ")[0])
    assert log.exists() and "srun" in log.read_text(), message  # the task's own Slurm log, kept
    assert f"kept {tmp_path / 'out.work'}" in proc.stderr
    assert not (tmp_path / "out.report.json").exists() and not list(tmp_path.glob("out_text_document*"))


def test_an_unreadable_input_fails_on_slurm_as_it_does_locally(cluster, corpus, tiny_base, tmp_path):
    import gzip

    whole = gzip.compress(corpus.read_bytes())
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(whole[: len(whole) // 2])
    local = prepare(broken, tiny_base, tmp_path / "local")
    slurm = prepare(broken, tiny_base, tmp_path / "slurm", "--executor", "slurm", "--slurm-profile", "local")
    assert local.returncode == slurm.returncode == 2
    assert local.stderr.strip().splitlines()[-1] == slurm.stderr.strip().splitlines()[-1]
    assert local.stderr.strip().splitlines()[-1].startswith(f"error: {broken}: truncated or corrupt gzip data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl.gz"]


def test_a_failed_stage_cancels_the_stages_after_it_at_once(cluster, tmp_path):
    """Slurm's kill_invalid_depend cancels a chain of dependents one scheduler pass (about 30 s) at a time;
    the engine cancels them as soon as the stage before them has ended with ranks undone. The jobs are
    submitted with --kill-on-invalid-dep=no, so Slurm never cancels them: a CANCELLED one was cancelled by
    the engine (no wall-clock bound needed to tell the two apart)."""
    from jp_peft.data.engine import _wait_for_jobs

    def submit(*args):
        out = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "%j.out"), *args], capture_output=True,
                             text=True, check=True).stdout
        return out.strip().split(";")[0]

    failed = submit("--wrap", "exit 1")
    chain = [failed]
    for _ in range(3):
        chain.append(submit(f"--dependency=afterok:{chain[-1]}", "--kill-on-invalid-dep=no", "--wrap", "true"))
    _wait_for_jobs(chain, lambda job: job == failed)
    states = {job: subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
              for job in chain[1:]}
    assert all("JobState=CANCELLED" in text for text in states.values()), states
    assert all("KillOInInvalidDependent=No" in text for text in states.values()), states  # not Slurm's doing
