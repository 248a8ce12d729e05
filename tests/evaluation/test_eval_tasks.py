"""Task resolution, data availability and rendering: no model involved."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest
import yaml

from jp_peft.evaluation import tasks as T
from jp_peft.evaluation.harness import config_sha256

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
BUNDLED_DIR = REPO / "src/jp_peft/evaluation/tasks"


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_task_sets_expand_in_order_without_duplicates():
    names = [s.name for s in T.resolve_tasks("jpeft_marc, jpeft,en")]
    assert names == ["jpeft_marc", "jpeft_jcqa", "jpeft_jnli", "jpeft_en_mc", "jpeft_ja_cont", "jpeft_en_cont",
                     "hellaswag", "arc_easy", "xwinograd_en"]
    assert [s.name for s in T.resolve_tasks(["ja_leaderboard"])] == list(T.JA_LEADERBOARD_MC)
    assert not set(T.JA_LEADERBOARD_GEN) & set(T.TASK_SETS["ja_leaderboard"])  # generation is opt-in
    origins = {s.name: s.origin for s in T.resolve_tasks("jpeft_jcqa,ja_leaderboard_jnli")}
    assert origins == {"jpeft_jcqa": "bundled", "ja_leaderboard_jnli": "production"}


def test_unknown_names_are_refused_by_name():
    with pytest.raises(T.UnknownTaskError, match="unknown task 'jcqa_typo'"):
        T.resolve_tasks("jpeft_jcqa,jcqa_typo")
    with pytest.raises(T.UnknownTaskError, match="ja_leaderboard_gen"):
        T.resolve_tasks("japanese_leaderboard")  # lm-eval's group mixes MC and generation


def test_bundled_tasks_render_with_absolute_data_files_outside_the_package(tmp_path):
    before = _tree_digest(BUNDLED_DIR)
    prepared = T.render_tasks(tmp_path, "jpeft")
    assert prepared.names == list(T.BUNDLED_TASKS)
    for name in T.BUNDLED_TASKS:
        rendered = yaml.safe_load((tmp_path / "tasks" / name / f"{name}.yaml").read_text(encoding="utf-8"))
        original = yaml.safe_load((BUNDLED_DIR / name / f"{name}.yaml").read_text(encoding="utf-8"))
        files = rendered["dataset_kwargs"]["data_files"]
        assert set(files) == {"test", "train"}
        for split, path in files.items():
            path = Path(path)
            assert path.is_absolute() and path.is_relative_to(tmp_path)
            rel = original["dataset_kwargs"]["data_files"][split]
            assert path.read_bytes() == (BUNDLED_DIR / name / rel).read_bytes()
        # everything but the data location is the bundled YAML
        strip = lambda c: {k: v for k, v in c.items() if k != "dataset_kwargs"}  # noqa: E731
        assert strip(rendered) == strip(original)
    assert _tree_digest(BUNDLED_DIR) == before  # nothing written into the package


def test_bundled_tasks_are_always_available():
    assert [s.name for s in T.check_available("jpeft")] == list(T.BUNDLED_TASKS)


def test_each_production_task_without_data_gets_one_line():
    with pytest.raises(T.MissingTaskDataError) as err:
        T.check_available("jpeft,ja_leaderboard,en")
    lines = str(err.value).splitlines()
    assert lines == err.value.lines
    wanted = [*T.JA_LEADERBOARD_MC, *T.ENGLISH_TASKS]
    assert [line.split(":")[0] for line in lines] == wanted
    assert all("--data-dir" in line and "`jp-peft eval fetch-data DATA_DIR --tasks " in line for line in lines)
    assert err.value.fetchable == wanted
    assert "Rakuten/JGLUE (JCommonsenseQA)" in lines[0] and "validation.jsonl (evaluated)" in lines[0]
    assert "train.jsonl (3-shot pool)" in lines[0]


def test_needed_splits_follow_lm_eval_few_shot_rule():
    jcqa = T.resolve_tasks("ja_leaderboard_jcommonsenseqa")[0].config  # YAML: num_fewshot 3, validation + train
    assert T.needed_splits(jcqa, None) == {"validation": "evaluated", "train": "3-shot pool"}
    assert T.needed_splits(jcqa, 0) == {"validation": "evaluated"}
    arc = T.resolve_tasks("arc_easy")[0].config  # no num_fewshot in its YAML
    assert T.needed_splits(arc, None) == {"test": "evaluated"}
    assert T.needed_splits(arc, 2) == {"test": "evaluated", "train": "2-shot pool"}
    assert T.effective_num_fewshot({"num_fewshot": 0}, 5) == 0  # lm-eval never overrides a YAML 0


def test_data_dir_names_the_missing_split(tmp_path, jnli_rows):
    _write_jsonl(tmp_path / "ja_leaderboard_jnli" / "validation.jsonl", jnli_rows)
    with pytest.raises(T.MissingTaskDataError) as err:
        T.check_available("ja_leaderboard_jnli", tmp_path)  # 3-shot by default: needs the train split
    (line,) = err.value.lines
    assert line.startswith("ja_leaderboard_jnli: no train (3-shot pool) in ")
    assert str(tmp_path / "ja_leaderboard_jnli") in line
    zero_shot = T.check_available("ja_leaderboard_jnli", tmp_path, num_fewshot=0)
    assert [s.name for s in zero_shot] == ["ja_leaderboard_jnli"]


def test_production_task_reads_data_dir_through_lm_evals_own_yaml(tmp_path, jnli_rows):
    from lm_eval.tasks import TaskManager

    _write_jsonl(tmp_path / "data" / "ja_leaderboard_jnli" / "validation.jsonl", jnli_rows)
    prepared = T.render_tasks(tmp_path / "render", "ja_leaderboard_jnli", tmp_path / "data", num_fewshot=0)
    rendered = yaml.safe_load((prepared.include_path[-1] / "ja_leaderboard_jnli" / "ja_leaderboard_jnli.yaml")
                              .read_text(encoding="utf-8"))
    assert rendered["include"].endswith("lm_eval/tasks/japanese_leaderboard/ja_leaderboard_jnli.yaml")
    assert rendered["dataset_path"] == "json" and rendered["dataset_name"] is None
    assert rendered["dataset_kwargs"]["data_files"] == {
        "validation": str((tmp_path / "data/ja_leaderboard_jnli/validation.jsonl").resolve())}
    assert rendered["training_split"] is None and rendered["fewshot_split"] is None  # no file: never read

    manager = TaskManager(include_path=[str(p) for p in prepared.include_path], include_defaults=False)
    task = manager.load(["ja_leaderboard_jnli"])["tasks"]["ja_leaderboard_jnli"]
    docs = list(task.eval_docs)
    assert [d["sentence1"] for d in docs] == [r["sentence1"] for r in jnli_rows]
    assert task.doc_to_text(docs[0]).startswith("### 指示：\n与えられた前提と仮説の関係を回答")
    assert task.doc_to_choice(docs[0]) == ["含意", "矛盾", "中立"]


def test_include_path_task_with_missing_local_file_is_refused(tmp_path):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({
        "task": "my_task", "dataset_path": "json", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "absent.jsonl")}}, "test_split": "test",
        "doc_to_text": "{{q}}", "doc_to_choice": ["a", "b"], "doc_to_target": 0}), encoding="utf-8")
    with pytest.raises(T.MissingTaskDataError, match=r"my_task: data_files not found: .*absent\.jsonl"):
        T.check_available("my_task", include_path=[tmp_path])
    _write_jsonl(tmp_path / "absent.jsonl", [{"q": "x"}])
    assert [s.origin for s in T.check_available("my_task", include_path=[tmp_path])] == ["include"]


def test_config_hash_ignores_where_data_lies_but_not_what_it_holds():
    config = {"task": "t", "dataset_path": "json", "num_fewshot": 0, "doc_to_text": "{{q}}",
              "dataset_kwargs": {"data_files": {"test": "/tmp/a/test.jsonl"}, "cache_dir": "/tmp/a/cache"},
              "metadata": {"version": 1.0, "config_source": "/tmp/a/t.yaml", "pretrained": "/models/x"}}
    moved = json.loads(json.dumps(config).replace("/tmp/a", "/elsewhere"))
    moved["metadata"]["pretrained"] = "/models/y"
    data = {"test": "ab" * 32}
    assert config_sha256(config, data) == config_sha256(moved, data)
    assert config_sha256(config, data) != config_sha256(config, {"test": "cd" * 32})
    assert config_sha256(config, data) != config_sha256({**config, "num_fewshot": 3}, data)


def test_package_data_globs_cover_every_bundled_file():
    import fnmatch

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = package_data["jp_peft.evaluation"]
    files = [str(p.relative_to(BUNDLED_DIR.parent)) for p in BUNDLED_DIR.rglob("*") if p.is_file()
             and "__pycache__" not in p.parts]
    assert len(files) == 1 + 6 * 3 + 1  # README, (yaml, test, fewshot) x 6, prompts
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
