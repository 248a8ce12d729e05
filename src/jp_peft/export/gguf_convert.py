"""Runs one of llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) from the pinned llama.cpp
source that `make deploy-tools` unpacked into the cache, in a process of its own (export/gguf.py starts it):

    python -m jp_peft.export.gguf_convert CONVERTER_DIR SCRIPT [the converter's arguments ...]

One adaptation, named and checked: llama.cpp's `TextModel.get_vocab_base_pre` (conversion/base.py:1629-1953 in
llama.cpp as vendored by llama-cpp-python 0.3.36) hashes the tokens of a fixed text and raises
NotImplementedError("BPE pre-tokenizer was not recognized ...") for any tokenizer whose hash it does not list.
Qwen2.5's own tokenizer is listed ("qwen2"); the embedded tiny model's byte-level BPE has another vocabulary and
so another hash, although its pre-tokenizer is Qwen2's exactly (the same Split regex, then ByteLevel). Only for a
tokenizer.json whose pre_tokenizer is exactly that, the unrecognised hash is answered with "qwen2" (the
pre-tokenizer llama.cpp then applies is the one the tokenizer declares). Any other tokenizer fails as upstream
does. If the upstream function no longer raises that message, this refuses to run rather than guess.
"""

from __future__ import annotations

import inspect
import json
import runpy
import sys
from pathlib import Path

UNRECOGNISED = "BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"
# Qwen2's pre-tokenizer as tokenizer.json states it (Qwen/Qwen2.5-0.5B, and the tiny model built after it)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def is_qwen2_pre_tokenizer(pre: dict | None) -> bool:
    if not isinstance(pre, dict) or pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (split.get("type") == "Split" and split.get("pattern") == {"Regex": QWEN2_SPLIT}
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False)


def _adapt_pre_tokenizer_lookup() -> None:
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre
    if UNRECOGNISED not in inspect.getsource(original):
        raise SystemExit(f"jp-peft: llama.cpp's TextModel.get_vocab_base_pre no longer raises {UNRECOGNISED!r}; "
                         "jp_peft/export/gguf_convert.py adapts exactly that: read conversion/base.py again")

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError as exc:
            declared = Path(self.dir_model) / "tokenizer.json"
            pre = json.loads(declared.read_text(encoding="utf-8")).get("pre_tokenizer") if declared.exists() else None
            if str(exc) != UNRECOGNISED or not is_qwen2_pre_tokenizer(pre):
                raise
            print(f"jp-peft: {declared}: Qwen2's pre-tokenizer (Split regex + ByteLevel) with another vocabulary: "
                  "tokenizer.ggml.pre = qwen2", file=sys.stderr)
            return "qwen2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    converter_dir, script, *args = argv
    sys.path[:0] = [converter_dir, str(Path(converter_dir) / "gguf-py")]
    _adapt_pre_tokenizer_lookup()
    sys.argv = [str(Path(converter_dir) / script), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
