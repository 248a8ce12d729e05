"""The bundled continuation tasks (jpeft_ja_cont, jpeft_en_cont): the committed files are the generator's
output, the text is held out from everything trained on, and every item is what tasks/README.md says."""

from __future__ import annotations

import json

import pytest

from jp_peft.data.normalize import normalize_text
from jp_peft.evaluation import continuation_tasks as CT
from jp_peft.evaluation.tasks import BUNDLED_TASKS, bundled_file
from jp_peft.spec.resolve import load_preset
from jp_peft.resources import bundled
from jp_peft.tiny import BASE_FILES, TOKENIZER_FILES

pytestmark = pytest.mark.unit


def test_committed_task_files_are_the_generators_output(tmp_path):
    written = CT.write_tasks(tmp_path)
    assert len(written) == 3 * len(CT.CONSTRUCTIONS)
    for path in written:
        committed = bundled_file(path.parent.name, path.name).read_bytes()
        assert committed == path.read_bytes(), (f"{path.parent.name}/{path.name} differs from the generator's output; "
                                                "rerun `python -m jp_peft.evaluation.continuation_tasks`")


def _training_texts() -> str:
    """Every text a model is trained on in this repository: the CPT blend's sources, SFT's, the tiny base's."""
    import yaml

    blend = yaml.safe_load(bundled("data/blends/ja90_en10.yaml").read_text(encoding="utf-8"))  # the smoke CPT blend
    sources = {src.removeprefix("{repo}/data/") for entry in blend["datasets"] for src in entry["source"]}
    assert sources == {"ja/cpt.train.jsonl", "en/replay.train.jsonl"}
    files = {*sources, "ja/cpt.train.jsonl", "en/replay.train.jsonl", "ja/sft_chatml.train.jsonl", "ja/sft_alpaca.train.jsonl",
             *TOKENIZER_FILES, *BASE_FILES}
    return "\n".join(normalize_text(line) for f in sorted(files)
                     for line in bundled(f"data/{f}").read_text(encoding="utf-8").splitlines())


def test_text_is_held_out_from_every_training_file():
    assert {c.source for c in CT.CONSTRUCTIONS} == {"data/ja/cpt.validation.jsonl", "data/en/replay.validation.jsonl"}
    trained = _training_texts()
    for c in CT.CONSTRUCTIONS:
        for split, items in CT.build_items(c).items():
            for item in items:
                true = item[f"choice{item['label']}"]
                # the passage's end and the true continuation, 24+ characters, appear in no training text
                probe = item["passage"][-20:] + (" " if c.lang == "en" else "") + true
                assert probe not in trained, (item["id"], probe)


@pytest.mark.parametrize("c", CT.CONSTRUCTIONS, ids=lambda c: c.task)
def test_items_are_the_documented_construction(c):
    docs = CT.documents(c)
    items = CT.build_items(c)
    assert len(items["test"]) >= 300 and items["fewshot"]
    test_docs = {it["doc"] for it in items["test"]}
    assert test_docs.isdisjoint(it["doc"] for it in items["fewshot"])  # the few-shot pool is other documents
    labels = [it["label"] for it in items["test"]]
    assert max(labels.count(k) for k in range(c.choices)) - min(labels.count(k) for k in range(c.choices)) <= 1
    other = "en" if c.lang == "ja" else "ja"
    for item in items["test"]:
        choices = [item[f"choice{k}"] for k in range(c.choices)]
        true = choices[item["label"]]
        if c.lang == "ja":  # the passage's own continuation (English: the whitespace between is one space)
            assert item["passage"] + true in docs[item["doc"]]
        else:
            assert _spaced(item["passage"] + " " + true) in _spaced(docs[item["doc"]])
        assert len(item["passage"]) >= c.min_prefix and true[-1] in "。!?.\"')"
        if c.lang == "ja":
            assert len(true) == c.continuation
        else:
            assert len(true.split()) == c.continuation
        assert len(set(choices)) == c.choices
        distractors = [x for k, x in enumerate(choices) if k != item["label"]]
        foreign = [x for x in distractors if _lang(x) == other]
        assert len(foreign) == c.foreign
        # the other language's distractor is no longer in bytes than the truth (neither metric favours it)
        assert all(len(x.encode()) <= len(true.encode()) for x in foreign)
        for x in distractors:  # same-language distractors: other documents' sentence endings
            if x not in foreign:
                assert not docs[item["doc"]].endswith(x) and any(x in d for i, d in enumerate(docs) if i != item["doc"])


def _spaced(text: str) -> str:
    return " ".join(text.split())


def _lang(text: str) -> str:
    return "ja" if any("\u3040" <= ch <= "\u9fff" for ch in text) else "en"


def test_deterministic_and_registered():
    assert CT.build_items(CT.JA) == CT.build_items(CT.JA)
    assert {"jpeft_ja_cont", "jpeft_en_cont"} <= set(BUNDLED_TASKS)
    smoke = load_preset("smoke")["eval"]
    assert "jpeft_ja_cont" in smoke["tasks_ja"] and "jpeft_en_cont" in smoke["tasks_en"]
    config = bundled_file("jpeft_ja_cont", "jpeft_ja_cont.yaml").read_text(encoding="utf-8")
    assert 'target_delimiter: ""' in config and "metric: acc_norm" in config
    first = json.loads(bundled_file("jpeft_ja_cont", "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"id", "doc", "passage", "choice0", "choice1", "choice2", "choice3", "label"}
