"""Instruction records (Alpaca or ChatML `messages`) -> Qwen2.5 ChatML training examples.

Each assistant turn becomes one example: `input` is the conversation so far rendered with
Qwen's template up to `<|im_start|>assistant\n`, `output` is the reply plus `<|im_end|>`.
Loss is taken on `output` only, so every assistant token is trained once and no user or
system token ever is. This is the input/output JSONL that NeMo's FineTuningDataModule reads.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class RecordError(ValueError):
    """A record lacks a field or has the wrong shape; `reason` is the reject category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def alpaca_to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise RecordError("missing_field", f"'{key}' missing or not a string")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError("missing_field", "'input' is not a string")
    user = record["instruction"] if not extra.strip() else f"{record['instruction']}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def chatml_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("missing_field", "'messages' missing or not a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise RecordError("missing_field", f"messages[{i}] needs role in {ROLES} and string content")
        out.append({"role": msg["role"], "content": msg["content"]})
    if out[-1]["role"] != "assistant":
        raise RecordError("missing_field", "the last message must be the assistant's")
    return out


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
