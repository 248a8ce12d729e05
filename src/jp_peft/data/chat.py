"""Instruction records (Alpaca or ChatML `messages`) -> Qwen2.5 ChatML training examples.

Each assistant turn becomes one example: `input` is the conversation so far rendered with
Qwen's template up to `<|im_start|>assistant\n`, `output` is the reply plus `<|im_end|>`.
Loss is taken on `output` only, so every assistant token is trained once and no user or
system token ever is. This is the input/output JSONL that NeMo's FineTuningDataModule reads.
"""

from __future__ import annotations

import re
from typing import Any

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Qwen's chat markup and its end of document: text containing them would be read as structure.
CONTROL_TOKENS = (IM_START, IM_END, "<|endoftext|>")


class RecordError(ValueError):
    """A record lacks a field or has the wrong shape; `reason` is the reject category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def require_string(value: Any, name: str) -> str:
    if value is None:
        raise RecordError("missing_field", f"'{name}' missing")
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"'{name}' is {_json_type(value)}, not a string")
    return value


def alpaca_to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = require_string(record.get("instruction"), "instruction")
    output = require_string(record.get("output"), "output")
    extra = record.get("input")
    extra = "" if extra is None else require_string(extra, "input")
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chatml_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    messages = record.get("messages")
    if messages is None or messages == []:
        raise RecordError("missing_field", "'messages' missing or empty")
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f"'messages' is {_json_type(messages)}, not a list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", f"messages[{i}] is {_json_type(msg)}, not an object")
        role = require_string(msg.get("role"), f"messages[{i}].role")
        if role not in ROLES:
            raise RecordError("missing_field", f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": require_string(msg.get("content"), f"messages[{i}].content")})
    if out[-1]["role"] != "assistant":
        raise RecordError("missing_field", "the last message must be the assistant's")
    return out


def control_token_pattern(special_tokens=()) -> re.Pattern:
    """Matches any of CONTROL_TOKENS or of the tokenizer's own special tokens (longest first)."""
    tokens = sorted({t for t in (*CONTROL_TOKENS, *special_tokens) if t}, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens))


def refuse_control_tokens(texts: dict[str, str], pattern: re.Pattern) -> None:
    """RecordError("control_token") naming the field whose (cleaned) text contains a control token."""
    for name, text in texts.items():
        if found := pattern.search(text):
            raise RecordError("control_token", f"{name} contains {found.group()!r}, which training would read as "
                                               "structure, not text")


def render_turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def to_examples(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """One {input, output} example per assistant turn."""
    examples, history = [], ""
    for msg in messages:
        if msg["role"] == "assistant":
            examples.append({"input": history + f"{IM_START}assistant\n", "output": msg["content"] + IM_END})
        history += render_turn(msg["role"], msg["content"])
    return examples
