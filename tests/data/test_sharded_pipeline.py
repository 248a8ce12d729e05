"""`jp-peft data prepare` on datatrove, sharded: duplicates are found across shards, every shard and the
whole run reconcile, the outputs do not depend on the number of tasks, a killed run continues from its
finished shards, memory does not grow with the corpus, and the pieces it is built from (byte-range
readers, indexed-dataset writer, Rust tokenizer, Japanese ratio) match what they replace."""

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jp_peft.data.normalize import is_japanese_char, japanese_ratio
from jp_peft.data.prepare import PrepareConfig
from jp_peft.data.run import prepare

DOC = "東京都は二日、新しい図書館の開館日を発表した。蔵書は約三十万冊で、平日は夜九時まで利用できる。"
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
KANJI = "日本語東京大阪京都会社学校先生図書館電車新聞天気時間研究開発計画経済政治文化歴史音楽映画写真料理"


def distinct_docs(n: int, seed: int = 0, length: int = 300) -> list[str]:
    """Japanese-looking documents that share almost no character 5-grams."""
    rng = random.Random(seed)
    alphabet = KANA + KANJI
    return [f"{i}: " + "".join(rng.choice(alphabet) for _ in range(length)) + "。" for i in range(n)]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def config(tiny_base, inputs, prefix, **kw):
    return PrepareConfig(inputs=tuple(str(p) for p in inputs), output_prefix=str(prefix), tokenizer=str(tiny_base),
                         max_chars=5000, progress=False, **kw)


def rejects(prefix) -> list[dict]:
    return [json.loads(line) for line in open(f"{prefix}.rejected.jsonl", encoding="utf-8")]


def outputs(prefix) -> dict[str, bytes]:
    return {ext: Path(f"{prefix}{ext}").read_bytes()
            for ext in ("_text_document.bin", "_text_document.idx", ".rejected.jsonl")}


# --- cross-shard deduplication and reconciliation --------------------------------------------

def shard_of(files: list[Path], name: str, line: int, tasks: int) -> int:
    """The shard that reads line `line` of file `name`: the one whose byte range holds the line's first byte."""
    offset = 0
    for path in files:
        data = path.read_bytes()
        if path.name == name:
            start = offset + sum(len(x) + 1 for x in data.split(b"\n")[:line - 1])
            total = sum(len(p.read_bytes()) for p in files)
            return max(k for k in range(tasks) if round(k * total / tasks) <= start)
        offset += len(data)
    raise ValueError(name)


@pytest.mark.integration
def test_duplicates_in_other_shards_are_found_and_name_the_kept_record(tmp_path, tiny_base):
    texts = distinct_docs(60)
    original = DOC + texts[0]
    near = original[:100] + "★" + original[101:200] + "★" + original[201:]  # two characters changed
    files = [write_jsonl(tmp_path / "a.jsonl", [original, *texts[1:20]]),  # the originals: a:1 and a:6 (texts[5])
             write_jsonl(tmp_path / "b.jsonl", [*texts[20:40], original]),  # b:21 the same text as a:1
             write_jsonl(tmp_path / "c.jsonl", [*texts[40:60], texts[5], near])]  # c:21 as a:6, c:22 near a:1
    report = prepare(config(tiny_base, files, tmp_path / "out", tasks=3))
    assert [shard_of(files, *where, 3) for where in (("a.jsonl", 1), ("a.jsonl", 6), ("b.jsonl", 21),
                                                     ("c.jsonl", 21), ("c.jsonl", 22))] == [0, 0, 1, 2, 2]
    assert report["tasks"] == 3 and report["read"] == 63 and report["kept"] == 60
    assert report["rejected"]["exact_duplicate"] == 2 and report["rejected"]["near_duplicate"] == 1
    by_line = {(Path(r["source"]).name, r["line"]): r for r in rejects(tmp_path / "out")}
    assert set(by_line) == {("b.jsonl", 21), ("c.jsonl", 21), ("c.jsonl", 22)}
    assert by_line[("b.jsonl", 21)]["reason"] == "exact_duplicate"
    assert by_line[("b.jsonl", 21)]["detail"].endswith(f"the same text as {files[0]}:1")
    assert by_line[("c.jsonl", 21)]["detail"].endswith(f"the same text as {files[0]}:6")
    assert by_line[("c.jsonl", 22)]["reason"] == "near_duplicate"
    assert by_line[("c.jsonl", 22)]["detail"].endswith(f"with {files[0]}:1")
    assert json.loads(by_line[("c.jsonl", 22)]["raw"])["text"] == near  # rejected byte for byte


@pytest.mark.integration
def test_every_shard_reconciles_and_the_outputs_do_not_depend_on_the_task_count(tmp_path, tiny_base):
    texts = distinct_docs(150, seed=1)
    rows = texts + texts[::7] + ["short", "English only, so it is filtered out of a Japanese corpus."] + texts[3:9]
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    reports = {n: prepare(config(tiny_base, [src], tmp_path / f"t{n}", tasks=n, workers=2)) for n in (1, 4, 7)}
    for n, report in reports.items():
        assert report["tasks"] == n and len(report["shards"]) == n
        assert sum(s["read"] for s in report["shards"]) == report["read"] == len(rows)
        assert sum(s["kept"] for s in report["shards"]) == report["kept"] == 150
        for shard in report["shards"]:
            assert shard["read"] == shard["kept"] + shard["rejected"]
        assert len(rejects(tmp_path / f"t{n}")) == report["rejected_total"] == len(rows) - 150
    assert outputs(tmp_path / "t1") == outputs(tmp_path / "t4") == outputs(tmp_path / "t7")
    lines = [r["line"] for r in rejects(tmp_path / "t7")]
    assert lines == sorted(lines)  # rejects in input order, whichever shard found them


@pytest.mark.integration
def test_text_blocks_split_across_shards_keep_their_lines(tmp_path, tiny_base):
    texts = distinct_docs(40, seed=2, length=120)
    blocks = []
    for i, text in enumerate(texts):  # multi-line blocks, runs of blank lines, CRLF
        half = len(text) // 2
        blocks.append(text[:half] + ("\r\n" if i % 3 else "\n") + text[half:])
    src = tmp_path / "blocks.txt"
    src.write_bytes("\ufeff".encode() + "\n\n\n".join(blocks[:20]).encode() + b"\n\n" + "\n\n".join(blocks[20:]).encode())
    one = prepare(config(tiny_base, [src], tmp_path / "one", tasks=1))
    many = prepare(config(tiny_base, [src], tmp_path / "many", tasks=9))
    assert one["kept"] == many["kept"] == 40 and many["read"] == 40
    assert outputs(tmp_path / "one") == outputs(tmp_path / "many")
    bad = tmp_path / "bad.txt"  # an undecodable block in the last shard keeps its true line number
    bad.write_bytes(src.read_bytes() + b"\n\n" + "壊れた".encode() + b"\xff\n")
    report = prepare(config(tiny_base, [bad], tmp_path / "bad", tasks=5))
    (reject,) = rejects(tmp_path / "bad")
    assert reject["reason"] == "invalid_utf8" and reject["line"] == bad.read_bytes().count(b"\n")
    assert report["read"] == 41


# --- resumability --------------------------------------------------------------------------------

# The run is killed from inside, right after the clean stage has marked its second shard finished: no
# polling for files against a fast machine ("make the input bigger"). The workers are forked (engine.py,
# start_method="fork"), so they inherit the hook; killpg takes the launcher and every worker at once.
DIE_AFTER_TWO_SHARDS = """
import os, signal, sys
from datatrove.executor.base import PipelineExecutor
from jp_peft.cli import main

mark = PipelineExecutor.mark_rank_as_completed

def mark_then_die(self, rank):
    mark(self, rank)
    done = os.path.join(self.logging_dir.path, "completions")
    if os.path.basename(os.path.normpath(self.logging_dir.path)) == "clean" and len(os.listdir(done)) >= 2:
        os.killpg(os.getpgid(0), signal.SIGKILL)  # the node died: nothing gets to clean up

PipelineExecutor.mark_rank_as_completed = mark_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.integration
def test_a_killed_run_continues_from_its_finished_shards(tmp_path, tiny_base):
    src = write_jsonl(tmp_path / "docs.jsonl", distinct_docs(600, seed=3, length=400))
    work = tmp_path / "work"
    args = ["data", "prepare", "--input", str(src), "--tokenizer", str(tiny_base), "--output-prefix",
            str(tmp_path / "out"), "--tasks", "6", "--workers", "2", "--work-dir", str(work), "--no-progress"]
    cmd = [sys.executable, "-m", "jp_peft.cli", *args]
    killed = subprocess.run([sys.executable, "-c", DIE_AFTER_TWO_SHARDS, *args], capture_output=True, text=True,
                            timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = work / "stages" / "clean" / "completions"
    finished = sorted(int(p.name) for p in done.iterdir())
    assert 2 <= len(finished) < 6 and not (tmp_path / "out.report.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "continuing from" in rerun.stderr and "continued from an earlier run" in rerun.stdout
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["resumed"]["tasks_finished_before"]["clean"] == len(finished)
    assert report["kept"] == report["read"] == 600 and not work.exists()
    fresh = prepare(config(tiny_base, [src], tmp_path / "fresh", tasks=6, workers=2))
    assert fresh["kept"] == 600 and outputs(tmp_path / "out") == outputs(tmp_path / "fresh")


@pytest.mark.integration
def test_a_work_dir_of_other_inputs_is_not_reused(tmp_path, tiny_base):
    work = tmp_path / "work"
    first = write_jsonl(tmp_path / "a.jsonl", distinct_docs(30, seed=4))
    prepare(config(tiny_base, [first], tmp_path / "a", tasks=2, work_dir=str(work), keep_work_dir=True))
    assert work.exists()
    first.write_text(first.read_text(encoding="utf-8") + json.dumps({"text": DOC}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    report = prepare(config(tiny_base, [first], tmp_path / "a", tasks=2, work_dir=str(work)))
    assert report["read"] == 31 and report["resumed"] == {} and not work.exists()


# --- bounded memory ------------------------------------------------------------------------------

MEASURE = ("import resource, subprocess, sys\n"
           "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, proc.returncode)\n")


def peak_rss_kb(cmd: list[str]) -> int:
    """The largest resident set of any process of `cmd` (the launcher and every worker it reaped)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, timeout=600)
    rss, code = out.stdout.split()
    assert code == "0", out.stderr[-2000:]
    return int(rss)


@pytest.mark.integration
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, tiny_base):
    """4x the distinct documents, same tasks: every process's peak RSS at most 1.3x, and far less growth
    per document than the in-memory MinHash index this pipeline replaced (3.4 KB a kept document)."""
    n = 3000
    texts = distinct_docs(4 * n, seed=5, length=400)
    sizes = {1: write_jsonl(tmp_path / "x1.jsonl", texts[:n]), 4: write_jsonl(tmp_path / "x4.jsonl", texts)}
    peaks = {}
    for scale, src in sizes.items():
        peaks[scale] = peak_rss_kb([sys.executable, "-m", "jp_peft.cli", "data", "prepare", "--input", str(src),
                                    "--tokenizer", str(tiny_base), "--output-prefix", str(tmp_path / f"o{scale}"),
                                    "--tasks", "2", "--workers", "2", "--no-progress"])
        assert json.loads((tmp_path / f"o{scale}.report.json").read_text())["kept"] == scale * n
    growth_per_doc = (peaks[4] - peaks[1]) * 1024 / (3 * n)
    assert peaks[4] <= 1.3 * peaks[1], peaks
    assert growth_per_doc < 1024, (peaks, growth_per_doc)


# --- the pieces ----------------------------------------------------------------------------------

@pytest.mark.unit
def test_indexed_datasets_are_megatron_cores_byte_for_byte(tmp_path):
    from jp_peft.data import indexed_dataset_module
    from jp_peft.data.outputs import INDEX_HEADER, INT32_CODE, IndexedDatasetWriter, merge_indexed_datasets

    im = indexed_dataset_module()
    assert im._INDEX_HEADER == INDEX_HEADER and im.DType.code_from_dtype(np.int32) == INT32_CODE
    rng = np.random.default_rng(0)
    shards = [[rng.integers(0, 151_000, rng.integers(1, 40)).astype(np.int32) for _ in range(n)] for n in (5, 0, 7, 1)]
    ours, theirs = [], []
    for i, docs in enumerate(shards):
        writer = IndexedDatasetWriter(str(tmp_path / f"ours{i}"))
        builder = im.IndexedDatasetBuilder(str(tmp_path / f"meg{i}.bin"), dtype=np.int32)
        for tokens in docs:
            writer.add_document(tokens)
            builder.add_document(tokens, [len(tokens)])
        writer.finalize()
        builder.finalize(str(tmp_path / f"meg{i}.idx"))
        ours.append(str(tmp_path / f"ours{i}"))
        theirs.append(str(tmp_path / f"meg{i}"))
        for ext in (".bin", ".idx"):
            assert Path(ours[-1] + ext).read_bytes() == Path(theirs[-1] + ext).read_bytes()
    builder = im.IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.int32)
    for prefix in theirs:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "meg.idx"))
    assert merge_indexed_datasets(ours, str(tmp_path / "ours.idx")) == 13
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "meg.idx").read_bytes()


@pytest.mark.unit
def test_the_rust_tokenizer_gives_transformers_ids_and_special_tokens(tiny_base):
    from transformers import AutoTokenizer

    from jp_peft.data.pipeline import _encode
    from jp_peft.data.prepare import RustTokenizer, special_tokens

    ours, theirs = RustTokenizer(Path(tiny_base)), AutoTokenizer.from_pretrained(str(tiny_base))
    assert ours.eos_token_id == theirs.eos_token_id is not None
    assert set(special_tokens(ours)) == set(special_tokens(theirs))
    texts = [DOC, "ＡＩと２０２４年、ｶﾀｶﾅ", "a<|im_end|>b<|endoftext|>", "", "  \n\n  ", *distinct_docs(20, seed=6)]
    assert _encode(ours, texts) == theirs(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.unit
def test_japanese_ratio_counts_like_the_per_character_definition():
    def reference(text):  # Japanese characters (letters or not: ・ counts) over letters and digits
        letters = sum(ch.isalnum() for ch in text)
        return sum(map(is_japanese_char, text)) / letters if letters else 0.0

    rng = random.Random(7)
    pools = [(0x20, 0x2FFF), (0x3000, 0x9FFF), (0xF900, 0xFFEF), (0x20000, 0x2A6DF)]
    for _ in range(3000):
        text = "".join(chr(rng.randint(*rng.choice(pools))) for _ in range(rng.randint(0, 40)))
        text = text.encode("utf-8", "ignore").decode("utf-8")
        assert japanese_ratio(text) == reference(text), repr(text)


@pytest.mark.unit
def test_the_experiments_data_stage_goes_to_slurm_only_for_a_large_corpus_inside_a_slurm_job(tmp_path, monkeypatch):
    from jp_peft.data.engine import executor_for
    from jp_peft.data.pool import usable_cores

    src = write_jsonl(tmp_path / "docs.jsonl", distinct_docs(10))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("JP_PEFT_DATA_SLURM_MIN_GB", "0")
    assert executor_for([src]) == {"executor": "local", "workers": usable_cores()}  # not a Slurm job
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert executor_for([src]) == {"executor": "slurm", "tasks": 1}
    monkeypatch.setenv("JP_PEFT_DATA_SLURM_MIN_GB", "1")
    assert executor_for([src])["executor"] == "local"  # a Slurm job, but a small corpus
