"""Cleaning, Japanese ratio, dedup and chat rendering, one behaviour at a time."""

import numpy as np
import pytest

from jp_peft.data import chat
from jp_peft.data.dedup import MinHasher, NearDuplicateIndex, content_hash, lsh_bands
from jp_peft.data.normalize import japanese_ratio, normalize_text

pytestmark = pytest.mark.unit


def test_nfkc_folds_full_width_and_half_width_katakana():
    assert normalize_text("ＡＩと２０２４年、ｶﾀｶﾅ") == "AIと2024年、カタカナ"


def test_control_characters_and_spaces_are_cleaned():
    raw = "  一行目\x00\x07  です\u200b。\t\t次\r\n\n\n\n二段落目\ufeff  "
    assert normalize_text(raw) == "一行目 です。 次\n\n二段落目"


@pytest.mark.parametrize("text, ratio", [
    ("今日は良い天気です", 1.0),
    ("Pythonの使い方", 0.4),  # 4 of 10 letters are Japanese: exactly 4/10
    ("This is English.", 0.0),
    ("１２３、。！", 0.0),  # digits count as letters, punctuation does not
])
def test_japanese_ratio(text, ratio):
    assert japanese_ratio(text) == ratio


def test_minhash_estimates_jaccard_and_lsh_finds_near_duplicates():
    hasher = MinHasher(num_perm=128)
    a = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた事だけは記憶している。"
    b = a.replace("薄暗い", "うす暗い")  # one small edit
    c = "東京都は二日、新しい図書館の開館日を発表した。蔵書は約三十万冊で、夜九時まで利用できる。"
    sa, sb, sc = hasher.signature(a), hasher.signature(b), hasher.signature(c)
    assert np.mean(sa == sb) > 0.8 and np.mean(sa == sc) < 0.1
    index = NearDuplicateIndex(128, threshold=0.8)
    index.add(sa)
    assert index.find(sb) is not None and index.find(sc) is None


def test_lsh_band_choice_tracks_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_bands(128, threshold)
        midpoint = (1 / bands) ** (1 / rows)
        assert bands * rows <= 128 and threshold - 0.1 < midpoint <= threshold


def test_content_hash_is_deterministic():
    assert content_hash("テスト") == content_hash("テスト") != content_hash("テスト。")


def test_alpaca_and_chatml_render_to_qwen_chatml_examples():
    messages = chat.alpaca_to_messages({"instruction": "翻訳して", "input": "Hello", "output": "こんにちは"})
    examples = chat.to_examples(messages)
    assert examples == [{"input": "<|im_start|>user\n翻訳して\n\nHello<|im_end|>\n<|im_start|>assistant\n",
                         "output": "こんにちは<|im_end|>"}]
    multi = chat.chatml_messages({"messages": [
        {"role": "system", "content": "丁寧に"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]})
    ex = chat.to_examples(multi)
    assert [e["output"] for e in ex] == ["A1<|im_end|>", "A2<|im_end|>"]  # every assistant turn is trained once
    assert ex[1]["input"].startswith("<|im_start|>system\n丁寧に<|im_end|>\n") and "A1<|im_end|>\n" in ex[1]["input"]


@pytest.mark.parametrize("record, match", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role"),
])
def test_bad_chat_records_are_missing_field_rejects(record, match):
    with pytest.raises(chat.RecordError, match=match) as info:
        chat.chatml_messages(record)
    assert info.value.reason == "missing_field"
