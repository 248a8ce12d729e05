"""`jp-peft data prepare` never destroys an input, checks its arguments before starting work, uses no
more workers than help, stops promptly when a worker dies, and leaves no temporary file behind."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

DOC = "東京都は二日、新しい図書館の開館日を発表した。蔵書は約三十万冊で、平日は夜九時まで利用できる。"


def run(cmd, timeout=120):
    """Run `cmd`; on timeout kill its whole process group (workers included) and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def cli(*args, timeout=120):
    return run([sys.executable, "-m", "jp_peft.cli", "data", "prepare", *map(str, args)], timeout)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def japanese_docs(path, n):
    rows = [{"text": f"{i}番目の記事。" + DOC + f"担当者は{i * 7 % 13}人で、{i}日に続報を出す。"} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_records(path, n):
    rows = [{"messages": [{"role": "user", "content": f"質問{i}：日本の首都は？"},
                          {"role": "assistant", "content": f"東京です。({i})"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- defect 1: an output on an input --------------------------------------------------------

@pytest.mark.parametrize("case", ["chatml_training_jsonl", "previous_rejects", "hard_link_to_report", "val_split"])
def test_output_that_would_replace_an_input_is_refused_and_the_input_kept(tmp_path, tiny_base, case):
    prefix = tmp_path / "X"
    if case == "chatml_training_jsonl":  # --input X/training.jsonl --output-prefix X
        prefix.mkdir()
        src = chat_records(prefix / "training.jsonl", 5)
        extra, clobbered = ["--format", "chatml"], src
    elif case == "previous_rejects":  # --input P.rejected.jsonl --output-prefix P
        src = japanese_docs(tmp_path / "X.rejected.jsonl", 5)
        extra, clobbered = [], src
    elif case == "hard_link_to_report":  # same inode under another name
        src = japanese_docs(tmp_path / "docs.jsonl", 5)
        os.link(src, tmp_path / "X.report.json")
        extra, clobbered = [], tmp_path / "X.report.json"
    else:  # only written when there is a validation split
        prefix.mkdir()
        src = chat_records(prefix / "validation.jsonl", 5)
        extra, clobbered = ["--format", "chatml", "--val-fraction", "0.2"], src
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    proc = cli("--input", src, "--tokenizer", tiny_base, "--output-prefix", prefix, "--no-progress", *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and str(src) in proc.stderr and str(clobbered.name) in proc.stderr
    assert {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written, nothing changed


# --- defect 2: tokenizer, worker count, dying workers, temporary files ----------------------

def test_missing_tokenizer_with_workers_exits_2_at_once(tmp_path):
    src = japanese_docs(tmp_path / "docs.jsonl", 200)  # several chunks: workers would be started
    proc = cli("--input", src, "--tokenizer", tmp_path / "no-such-tokenizer", "--output-prefix", tmp_path / "out",
               "--workers", "2", timeout=90)  # the old code looped forever restarting workers
    assert proc.returncode == 2 and "--tokenizer" in proc.stderr and "no-such-tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_workers_are_capped_at_the_useful_number_and_the_run_says_so(tmp_path, tiny_base):
    src = japanese_docs(tmp_path / "docs.jsonl", 5)  # one chunk of work
    proc = cli("--input", src, "--tokenizer", tiny_base, "--output-prefix", tmp_path / "out", "--workers", "999",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--workers 999: using 1" in proc.stderr
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["workers"] == 1 and report["kept"] == 5


WORKER_DIES = """
import os, sys
import jp_peft.data.prepare as prepare
from jp_peft.data.run import prepare as run_prepare

def die(chunk):  # what the OOM killer does to a worker
    os._exit(3)

prepare._process_chunk = die
prepare.usable_cores = lambda: 4  # two workers even on a one-core machine
cfg = prepare.PrepareConfig(inputs=(sys.argv[1],), output_prefix=sys.argv[2], tokenizer=sys.argv[3], workers=2,
                            progress=False)
try:
    run_prepare(cfg)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(1)
"""


def test_a_dying_worker_fails_the_run_promptly_and_cleans_up(tmp_path, tiny_base):
    src = japanese_docs(tmp_path / "docs.jsonl", 300)
    # timeout: the old multiprocessing.Pool waited for the dead worker's chunk forever
    proc = run([sys.executable, "-c", WORKER_DIES, str(src), str(tmp_path / "out"), str(tiny_base)], timeout=90)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.startswith("WorkerError: a worker process died")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_invalid_near_dedup_threshold_exits_2_and_leaves_nothing(tmp_path, tiny_base):
    src = japanese_docs(tmp_path / "docs.jsonl", 5)
    proc = cli("--input", src, "--tokenizer", tiny_base, "--output-prefix", tmp_path / "out", "--near-dedup-threshold", "0")
    assert proc.returncode == 2 and "--near-dedup-threshold: must be in (0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


SLOW_MERGE = """
import sys, time
from jp_peft.data.outputs import PreparedOutputs
from jp_peft.cli import main

append_shard = PreparedOutputs.append_shard

def slow(self, shard_prefix):  # a big corpus: the temporary outputs are still being written when the signal comes
    time.sleep(1)
    return append_shard(self, shard_prefix)

PreparedOutputs.append_shard = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_mid_run_removes_the_temporary_outputs(tmp_path, tiny_base):
    # The final merge is slowed (not the input made bigger): a fast CI machine once merged 30,000 documents
    # between two looks for the temporary outputs, and the test failed on timing alone.
    src = japanese_docs(tmp_path / "docs.jsonl", 300)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "data", "prepare", "--input", str(src), "--tokenizer",
                             str(tiny_base), "--output-prefix", str(tmp_path / "out"), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not list(tmp_path.glob("*.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)  # what scancel or a stage's time limit does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]
