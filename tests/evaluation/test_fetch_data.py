"""`jp-peft eval fetch-data`: the production tasks' data written from a local copy of the Hub data sets
(a save_to_disk directory, plain jsonl, parquet) into the layout the eval stage reads, with its manifest;
existing files never replaced silently; bad input exits 2 naming the option or file. No network."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from jp_peft.cli import main as jp_peft
from jp_peft.evaluation import tasks as T
from jp_peft.evaluation.fetch_data import MANIFEST, fetch_task_data, production_tasks
from jp_peft.spec import load_preset

pytestmark = pytest.mark.unit

TASKS = ["ja_leaderboard_jnli", "ja_leaderboard_xwinograd", "arc_easy"]


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def source(tmp_path, jnli_rows):
    """A local copy of three Hub data sets in the three forms fetch-data reads, one per data set: JGLUE JNLI
    as `DatasetDict.save_to_disk`, xwinograd-ja as plain jsonl, ARC-Easy as parquet."""
    import datasets

    root = tmp_path / "hf-datasets"
    datasets.DatasetDict({split: datasets.Dataset.from_list(jnli_rows) for split in ("train", "validation")}
                         ).save_to_disk(str(root / "Rakuten/JGLUE/JNLI"))
    _jsonl(root / "polm-stability/xwinograd-ja/test.jsonl",
           [{"sentence1": "太郎は花子にボールを投げた。", "sentence2": "花子はそれを受け取った。", "answer": 1}])
    arc = [{"id": f"arc-{i}", "question": f"q{i}", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
            "answerKey": "A"} for i in range(3)]
    for split in ("train", "test"):
        (root / "allenai/ai2_arc/ARC-Easy").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(arc).to_parquet(str(root / f"allenai/ai2_arc/ARC-Easy/{split}.parquet"))
    return root, arc


def test_local_source_writes_the_layout_the_eval_stage_reads_with_checksums(tmp_path, source, jnli_rows, capsys):
    root, arc = source
    data = tmp_path / "lm-eval"
    assert jp_peft(["eval", "fetch-data", str(data), "--tasks", ",".join(TASKS), "--from", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"[1/3] ja_leaderboard_jnli: validation, train from {root}/Rakuten/JGLUE/JNLI" in out
    assert f"wrote {data}/arc_easy/test.jsonl (3 rows, sha256 " in out and f"eval.data_dir={data}" in out
    assert _rows(data / "ja_leaderboard_jnli/validation.jsonl") == jnli_rows  # rows unchanged
    assert _rows(data / "arc_easy/train.jsonl") == arc
    manifest = json.loads((data / MANIFEST).read_text(encoding="utf-8"))
    assert sorted(manifest["files"]) == ["arc_easy/test.jsonl", "arc_easy/train.jsonl",
                                         "ja_leaderboard_jnli/train.jsonl", "ja_leaderboard_jnli/validation.jsonl",
                                         "ja_leaderboard_xwinograd/test.jsonl"]
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((data / rel).read_bytes()).hexdigest()
    assert manifest["files"]["ja_leaderboard_jnli/train.jsonl"]["dataset"] == "Rakuten/JGLUE (JNLI)"
    # what the eval stage checks before a launch: every task has its files (the few-shot pool included)
    assert [s.name for s in T.check_available(TASKS, data)] == TASKS
    assert sorted(p.name for p in data.rglob("*") if p.name.startswith(".")) == []  # no temporary file left


def test_rerun_keeps_matching_files_and_refuses_changed_ones(tmp_path, source, capsys):
    root, _ = source
    data = tmp_path / "lm-eval"
    fetch_task_data(data, TASKS, root)
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*.jsonl")}
    fetch_task_data(data, TASKS, root)
    assert "[2/3] ja_leaderboard_xwinograd: kept (files match MANIFEST.json)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*.jsonl")} == before

    edited = data / "arc_easy/test.jsonl"
    edited.write_text('{"id": "mine"}\n', encoding="utf-8")
    args = ["eval", "fetch-data", str(data), "--tasks", ",".join(TASKS), "--from", str(root)]
    assert jp_peft(args) == 2
    assert capsys.readouterr().err == (f"error: {edited} exists and differs from its MANIFEST.json entry; move it "
                                       "away or pass --overwrite to replace it\n")
    assert edited.read_text(encoding="utf-8") == '{"id": "mine"}\n'
    assert jp_peft([*args, "--overwrite"]) == 0
    assert len(_rows(edited)) == 3


def test_the_eval_stage_refuses_a_fetched_file_that_changed_since(tmp_path, source):
    """What the launcher (plan time), the eval stage and `jp-peft eval` check before scoring: a file that no longer
    matches its MANIFEST.json entry is refused, naming it and the command that fetches it again; a file the
    manifest does not list (the user's own) is read as it is."""
    from jp_peft.evaluation.suite import suite_problems
    from jp_peft.spec import resolve_spec

    root, _ = source
    data = tmp_path / "lm-eval"
    fetch_task_data(data, TASKS, root)
    spec = resolve_spec(load_preset("smoke"), [f"eval.data_dir={data}", "eval.tasks_ja=[ja_leaderboard_jnli]",
                                               "eval.tasks_en=[arc_easy]", "stages=[eval]"])
    assert suite_problems(spec) == []
    edited = data / "arc_easy/test.jsonl"
    edited.write_bytes(edited.read_bytes().replace(b'"A"', b'"B"'))  # the answer keys changed by hand
    (problem,) = suite_problems(spec)
    assert problem.startswith(f"eval.tasks_en: arc_easy: {edited} differs from {data / MANIFEST} (sha256 ")
    assert problem.endswith(f"fetch again with `jp-peft eval fetch-data {data} --tasks arc_easy --overwrite` on a "
                            "machine with network")
    with pytest.raises(T.MissingTaskDataError):
        T.check_available(["arc_easy"], data)  # the eval stage and `jp-peft eval` go through this check
    manifest = json.loads((data / MANIFEST).read_text(encoding="utf-8"))
    del manifest["files"]["arc_easy/test.jsonl"]  # a file the manifest does not list: the user's own, read as is
    (data / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    assert suite_problems(spec) == []
    (data / MANIFEST).write_text("{", encoding="utf-8")
    assert [line.split(": ", 2)[2] for line in suite_problems(spec)] == [
        f"{data / MANIFEST}: not JSON (Expecting property name enclosed in double quotes, line 1); move it away to "
        "fetch again"] * 2


def test_a_file_the_manifest_does_not_know_is_not_replaced(tmp_path, source, capsys):
    root, _ = source
    data = tmp_path / "lm-eval"
    mine = _jsonl(data / "ja_leaderboard_xwinograd/test.jsonl", [{"mine": True}])
    assert jp_peft(["eval", "fetch-data", str(data), "--tasks", "ja_leaderboard_xwinograd", "--from", str(root)]) == 2
    assert f"error: {mine} exists and is not in MANIFEST.json" in capsys.readouterr().err
    assert _rows(mine) == [{"mine": True}] and not (data / MANIFEST).exists()


@pytest.mark.parametrize("case, message", [
    ("no source", "error: --from: {tmp}/absent is not a directory"),
    ("no data set", "error: --from: {tmp}/hf-datasets/Rowan/hellaswag is not a directory"),
    ("no split", "error: --from: {tmp}/hf-datasets/polm-stability/xwinograd-ja/test.jsonl (or .json, .parquet, "
                 ".csv) not found, needed by ja_leaderboard_xwinograd"),
    ("unknown task", "error: --tasks: unknown task 'hellaswag_typo'"),
    ("bundled only", "error: --tasks: jpeft_jcqa needs no data (bundled tasks are in the package)"),
    ("data dir is a file", "error: DATA_DIR: {tmp}/lm-eval is a file, not a directory"),
    ("broken manifest", "error: {tmp}/lm-eval/MANIFEST.json: not JSON"),
])
def test_bad_input_exits_2_naming_the_option_or_file(tmp_path, source, capsys, case, message):
    root, _ = source
    data, tasks, src = tmp_path / "lm-eval", "ja_leaderboard_xwinograd", root
    if case == "no source":
        src = tmp_path / "absent"
    elif case == "no data set":
        tasks = "hellaswag"
    elif case == "no split":
        (root / "polm-stability/xwinograd-ja/test.jsonl").unlink()
    elif case == "unknown task":
        tasks = "hellaswag_typo"
    elif case == "bundled only":
        tasks = "jpeft_jcqa"
    elif case == "data dir is a file":
        data.write_text("")
    elif case == "broken manifest":
        data.mkdir()
        (data / MANIFEST).write_text("{")
    assert jp_peft(["eval", "fetch-data", str(data), "--tasks", tasks, "--from", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path)) and len(err.splitlines()) == 1, err
    assert not (data / "ja_leaderboard_xwinograd").exists()


def test_from_the_hub_loads_each_data_set_by_its_lm_eval_name(tmp_path, monkeypatch, jnli_rows):
    """Without --from (a machine with network): datasets.load_dataset(dataset_path, dataset_name), as lm-eval's
    YAML names them; here it is replaced by the rows, the network being out of reach."""
    import datasets

    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict({s: datasets.Dataset.from_list(jnli_rows) for s in ("train", "validation")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    manifest = fetch_task_data(tmp_path, ["ja_leaderboard_jnli"], log=lambda line: None)
    assert calls == [("Rakuten/JGLUE", "JNLI")]
    assert manifest["files"]["ja_leaderboard_jnli/validation.jsonl"]["source"] == "hf://datasets/Rakuten/JGLUE (JNLI)"
    assert _rows(tmp_path / "ja_leaderboard_jnli/validation.jsonl") == jnli_rows
    assert [s.name for s in T.check_available("ja_leaderboard_jnli", tmp_path)] == ["ja_leaderboard_jnli"]


def test_default_tasks_are_the_production_presets():
    ev = load_preset("qwen25_500m_ja")["eval"]
    assert production_tasks() == [*ev["tasks_ja"], *ev["tasks_en"]] == ["ja_leaderboard", "en"]
