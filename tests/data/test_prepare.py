"""`jp-peft data prepare` end to end: counts reconcile, rejects keep file:line, outputs read back."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from jp_peft.data.normalize import normalize_text
from jp_peft.data.errors import StrictModeError
from jp_peft.data.prepare import PrepareConfig
from jp_peft.data.run import prepare

DOC_A = ("東京都は二日、新しい図書館の開館日を発表した。蔵書は約三十万冊で、平日は夜九時まで利用できる。"
         "館内には子ども向けの読書室やカフェも設けられ、週末には作家を招いた講演会も開かれる予定だという。")
DOC_B = "ｐｉｐ　ｉｎｓｔａｌｌ　でパッケージを入れたあと、仮想環境を有効にしてから実行してください。"
DOC_C = "春の京都は観光客でにぎわう。哲学の道の桜は今年も見事で、川沿いの小道をゆっくり歩く人が多かった。"
NEAR_A = DOC_A.replace("夜九時", "夜八時")  # one character: estimated Jaccard ~0.9


def write_malformed(path):
    """One of every kind of bad record, each on a known line."""
    lines = [
        json.dumps({"text": DOC_A}, ensure_ascii=False).encode(),        # 1 kept
        b'{"text": "broken json',                                         # 2 invalid_json
        '{"text": "壊れた'.encode() + b"\xff\xfe" + '文字"}'.encode(),     # 3 invalid_utf8
        json.dumps({"body": DOC_B}, ensure_ascii=False).encode(),        # 4 missing_field
        json.dumps({"text": "  \u200b \x00 "}).encode(),                  # 5 empty_after_cleaning
        json.dumps({"text": DOC_A}, ensure_ascii=False).encode(),        # 6 exact_duplicate
        json.dumps({"text": "あ" * 5000}, ensure_ascii=False).encode(),   # 7 too_long
        json.dumps({"text": "短い"}, ensure_ascii=False).encode(),        # 8 too_short
        json.dumps({"text": "This document is written entirely in English, so it is filtered out."}).encode(),  # 9
        json.dumps({"text": NEAR_A}, ensure_ascii=False).encode(),       # 10 near_duplicate
        json.dumps({"text": DOC_B}, ensure_ascii=False).encode(),        # 11 kept
        json.dumps({"text": DOC_C}, ensure_ascii=False).encode(),        # 12 kept
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {2: "invalid_json", 3: "invalid_utf8", 4: "missing_field", 5: "empty_after_cleaning",
            6: "exact_duplicate", 7: "too_long", 8: "too_short", 9: "not_japanese_enough", 10: "near_duplicate"}


def config(tiny_base, inputs, prefix, **kw):
    return PrepareConfig(inputs=tuple(str(p) for p in inputs), output_prefix=str(prefix), tokenizer=str(tiny_base),
                         max_chars=2000, progress=False, **kw)


@pytest.mark.integration
def test_malformed_input_reconciles_and_keeps_every_reject(tmp_path, tiny_base):
    src = tmp_path / "bad.jsonl"
    expected = write_malformed(src)
    report = prepare(config(tiny_base, [src], tmp_path / "out"))
    assert report["read"] == 12
    assert report["kept"] == 3
    assert report["read"] == report["kept"] + sum(report["rejected"].values()) == report["kept"] + report["rejected_total"]
    rejects = [json.loads(line) for line in open(tmp_path / "out.rejected.jsonl", encoding="utf-8")]
    assert {r["line"]: r["reason"] for r in rejects} == expected
    assert all(r["source"] == str(src) for r in rejects)
    # verbatim: the raw line comes back as it was (invalid bytes shown as U+FFFD)
    by_line = {r["line"]: r for r in rejects}
    assert by_line[2]["raw"] == '{"text": "broken json'
    assert "\ufffd" in by_line[3]["raw"]
    on_disk = json.loads((tmp_path / "out.report.json").read_text())
    assert on_disk["rejected"] == report["rejected"] and on_disk["chars_per_token"] > 0


@pytest.mark.integration
def test_strict_fails_at_the_first_bad_line_and_leaves_no_output(tmp_path, tiny_base):
    src = tmp_path / "bad.jsonl"
    write_malformed(src)
    with pytest.raises(StrictModeError, match=rf"{src}:2: rejected \(invalid_json"):
        prepare(config(tiny_base, [src], tmp_path / "out", strict=True))
    assert list(tmp_path.iterdir()) == [src]  # no partial output that looks complete
    cli = subprocess.run([sys.executable, "-m", "jp_peft.cli", "data", "prepare", "--input", str(src), "--tokenizer",
                          str(tiny_base), "--output-prefix", str(tmp_path / "cli"), "--strict", "--no-progress"],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and f"{src}:2" in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.integration
def test_indexed_dataset_reads_back_in_input_order_whatever_the_workers(tmp_path, tiny_base):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    docs = [DOC_A, DOC_B, DOC_C] + [f"{i}番目の文書です。" + DOC_C[::-1] * (1 + i % 3) + f"終わり{i}。" for i in range(40)]
    # plain text input (blank-line separated) gzipped, to exercise that reader too
    src = tmp_path / "docs.txt.gz"
    with gzip.open(src, "wt", encoding="utf-8") as handle:
        handle.write("\n\n".join(docs) + "\n")
    reports = {w: prepare(config(tiny_base, [src], tmp_path / f"w{w}", workers=w, near_dedup=False)) for w in (1, 2)}
    assert reports[1]["kept"] == reports[2]["kept"] == len(docs)
    assert (tmp_path / "w1_text_document.bin").read_bytes() == (tmp_path / "w2_text_document.bin").read_bytes()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    dataset = IndexedDataset(str(tmp_path / "w2_text_document"))
    assert len(dataset) == len(docs)
    for i, doc in enumerate(docs):
        tokens = dataset[i]
        assert tokens[-1] == tok.eos_token_id  # EOS appended to every document
        assert tok.decode(tokens[:-1]) == normalize_text(doc)
    assert reports[1]["tokens"] + len(docs) == int(np.sum(dataset.sequence_lengths))


@pytest.mark.integration
def test_validation_split_is_deterministic_by_content(tmp_path, tiny_base):
    docs = [f"第{i}回の会議では、来年度の予算と新しい事業の進め方について{i % 7}時間議論した。" for i in range(200)]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    first = prepare(config(tiny_base, [src], tmp_path / "a", val_fraction=0.2, near_dedup=False))
    src2 = tmp_path / "shuffled.jsonl"
    src2.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in reversed(docs)) + "\n", encoding="utf-8")
    second = prepare(config(tiny_base, [src2], tmp_path / "b", val_fraction=0.2, near_dedup=False))
    assert 20 < first["kept_validation"] < 60
    assert first["kept_validation"] == second["kept_validation"]  # membership follows content, not position


@pytest.mark.integration
def test_chat_records_become_nemo_input_output_jsonl(tmp_path, tiny_base):
    src = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"質問{i}：日本の首都は？"},
                          {"role": "assistant", "content": f"東京です。({i})"}]} for i in range(30)]
    rows.append({"messages": [{"role": "user", "content": "返事がない"}]})  # rejected: no assistant turn
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    report = prepare(config(tiny_base, [src], tmp_path / "sft", format="chatml", min_chars=2, min_ja_ratio=0.0,
                            near_dedup=False, val_fraction=0.2))
    assert report["rejected"]["missing_field"] == 1 and report["kept"] == 30
    train = [json.loads(x) for x in open(tmp_path / "sft" / "training.jsonl", encoding="utf-8")]
    val = [json.loads(x) for x in open(tmp_path / "sft" / "validation.jsonl", encoding="utf-8")]
    assert len(train) + len(val) == report["examples_train"] + report["examples_validation"] == 30
    assert train[0]["input"].endswith("<|im_start|>assistant\n") and train[0]["output"].endswith("<|im_end|>")
