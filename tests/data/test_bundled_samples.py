"""The samples under data/ are what data/README.md says: sizes, formats, held-out splits."""

import json
from pathlib import Path

import pytest

from jp_peft.data.dedup import content_hash
from jp_peft.data.normalize import japanese_ratio, normalize_text

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[2] / "data"


def records(relative: str) -> list[dict]:
    path = DATA / relative
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            pytest.fail(f"{path}:{number}: {exc}")
    return out


def both_splits(stem: str) -> tuple[list[dict], list[dict]]:
    return records(f"{stem}.train.jsonl"), records(f"{stem}.validation.jsonl")


def key(record: dict) -> str:
    return content_hash(normalize_text(json.dumps(record, ensure_ascii=False, sort_keys=True)))


@pytest.mark.parametrize("stem, min_docs, min_bytes, japanese", [
    ("ja/cpt", 2000, 1_000_000, True),
    ("en/replay", 500, 0, False),
])
def test_raw_text_samples_are_big_enough_and_in_their_language(stem, min_docs, min_bytes, japanese):
    train, validation = both_splits(stem)
    assert len(train) >= min_docs and validation
    assert sum(len(r["text"].encode("utf-8")) for r in train) >= min_bytes
    ratios = [japanese_ratio(normalize_text(r["text"])) for r in train + validation]
    if japanese:
        assert min(ratios) >= 0.3  # the pipeline's default filter keeps every bundled document
    else:
        assert max(ratios) == 0.0


@pytest.mark.parametrize("stem, fields", [
    ("ja/sft_alpaca", {"instruction", "input", "output"}),
    ("ja/sft_chatml", {"messages"}),
])
def test_instruction_samples_have_500_records_in_each_format(stem, fields):
    train, validation = both_splits(stem)
    assert len(train) + len(validation) >= 500 and len(validation) > 0
    for record in train + validation:
        assert set(record) == fields
        if "messages" in record:
            roles = [m["role"] for m in record["messages"]]
            assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}


@pytest.mark.parametrize("stem", ["ja/cpt", "en/replay", "ja/sft_alpaca", "ja/sft_chatml"])
def test_validation_is_never_trained_on_and_nothing_repeats(stem):
    train, validation = both_splits(stem)
    train_keys, validation_keys = [key(r) for r in train], [key(r) for r in validation]
    assert len(set(train_keys)) == len(train_keys) and len(set(validation_keys)) == len(validation_keys)
    assert not set(train_keys) & set(validation_keys)
