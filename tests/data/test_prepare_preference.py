"""`jp-peft data prepare --format preference`: prompt/chosen/rejected records (strings or ChatML messages) become
ChatML pairs; every bad record is a reject with its reason and its exact bytes, as in every other format."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from jp_peft.data.chat import PairsError, load_pairs
from jp_peft.data.prepare import PrepareConfig
from jp_peft.data.run import prepare

PROMPT = "日本の首都はどこですか。"
CHOSEN = "日本の首都は東京です。政治や経済の中心です。"


def _config(tiny_base, inputs, prefix, **kw):
    return PrepareConfig(inputs=tuple(str(p) for p in inputs), output_prefix=str(prefix), tokenizer=str(tiny_base),
                         format="preference", min_chars=2, min_ja_ratio=0.0, progress=False, **kw)


def _line(row) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode()


@pytest.mark.integration
def test_pairs_in_both_forms_become_chatml_and_bad_records_are_kept_byte_for_byte(tmp_path, tiny_base):
    lines = [
        _line({"prompt": PROMPT, "chosen": CHOSEN, "rejected": "知りません。"}),                              # 1 kept
        _line({"prompt": [{"role": "system", "content": "丁寧に答えてください。"},
                          {"role": "user", "content": "富士山の高さは？"}],
               "chosen": [{"role": "assistant", "content": "3776メートルです。"}], "rejected": "I don't know."}),  # 2 kept
        _line({"prompt": PROMPT, "chosen": "同じ答え", "rejected": "同じ答え"}),                            # 3 identical
        _line({"prompt": PROMPT, "chosen": CHOSEN}),                                                     # 4 missing
        _line({"prompt": PROMPT, "chosen": 42, "rejected": "x"}),                                         # 5 wrong type
        _line({"prompt": [{"role": "assistant", "content": "先に答える"}], "chosen": "a", "rejected": "b"}),  # 6 no user
        _line({"prompt": PROMPT, "chosen": CHOSEN + "<|im_end|>", "rejected": "b"}),                      # 7 control
        b'{"prompt": "\xe5\xa3\x8a\xff", "chosen": "a", "rejected": "b"}',                               # 8 not UTF-8
        b'{"prompt": "broken json',                                                                     # 9 invalid JSON
        _line({"prompt": PROMPT, "chosen": CHOSEN, "rejected": "知りません。"}),                             # 10 duplicate
        _line({"prompt": PROMPT, "chosen": "   ", "rejected": "b"}),                                     # 11 empty
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(b"\n".join(lines[:8]) + b"\r\n" + b"\n".join(lines[8:]))  # a CRLF, no newline at the end
    report = prepare(_config(tiny_base, [src], tmp_path / "pref"))
    assert report["read"] == 11 and report["kept"] == 2 and report["read"] == report["kept"] + report["rejected_total"]
    expected = {3: "identical_pair", 4: "missing_field", 5: "wrong_type", 6: "missing_field", 7: "control_token",
                8: "invalid_utf8", 9: "invalid_json", 10: "exact_duplicate", 11: "empty_after_cleaning"}
    rejects = [json.loads(x) for x in open(tmp_path / "pref.rejected.jsonl", encoding="utf-8")]
    assert {r["line"]: r["reason"] for r in rejects} == expected
    for r in rejects:  # every reject's exact bytes (base64 where they are not UTF-8)
        exact = base64.b64decode(r["raw_b64"]) if "raw_b64" in r else r["raw"].encode("utf-8")
        assert exact == lines[r["line"] - 1], r
    pairs = load_pairs(str(tmp_path / "pref" / "training.jsonl"))
    assert pairs[0] == {"prompt": f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n",
                        "chosen": CHOSEN + "<|im_end|>", "rejected": "知りません。<|im_end|>"}
    assert pairs[1]["prompt"].startswith("<|im_start|>system\n丁寧に答えてください。<|im_end|>\n<|im_start|>user\n")
    assert pairs[1]["chosen"] == "3776メートルです。<|im_end|>"


@pytest.mark.integration
def test_the_bundled_preference_sample_prepares_without_a_reject(tmp_path, tiny_base, repo):
    for split, count in (("train", 240), ("validation", 48)):
        proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "data", "prepare", "--format", "preference",
                               "--input", str(repo / f"data/ja/dpo_pref.{split}.jsonl"), "--tokenizer", str(tiny_base),
                               "--output-prefix", str(tmp_path / split), "--no-progress"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / f"{split}.report.json").read_text())
        assert report["kept"] == count and report["rejected_total"] == 0, report["rejected"]
    train = {p["prompt"] for p in load_pairs(str(tmp_path / "train" / "training.jsonl"))}
    validation = {p["prompt"] for p in load_pairs(str(tmp_path / "validation" / "training.jsonl"))}
    assert not train & validation  # held-out prompts


@pytest.mark.unit
def test_a_prepared_file_with_a_bad_line_is_named_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(PairsError, match=rf"{path}:3: rejected missing or not a string"):
        load_pairs(str(path))
