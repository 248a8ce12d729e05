"""Instruction records (Alpaca or ChatML `messages`) -> Qwen2.5 ChatML training examples, and preference
records (`prompt`, `chosen`, `rejected`) -> ChatML preference pairs.

Each assistant turn becomes one example: `input` is the conversation so far rendered with
Qwen's template up to `<|im_start|>assistant\n`, `output` is the reply plus `<|im_end|>`.
Loss is taken on `output` only, so every assistant token is trained once and no user or
system token ever is. This is the input/output JSONL that NeMo's FineTuningDataModule reads.
A preference pair is rendered the same way: `prompt` up to `<|im_start|>assistant\n`, `chosen` and
`rejected` each a reply plus `<|im_end|>` (TRL's DPOTrainer reads these three strings).
"""

from __future__ import annotations

import json
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
    out = _message_list(record.get("messages"), "messages")
    if out[-1]["role"] != "assistant":
        raise RecordError("missing_field", "the last message must be the assistant's")
    return out


def _message_list(messages: Any, name: str) -> list[dict[str, str]]:
    """A non-empty list of {role, content} objects, each checked."""
    if messages is None or messages == []:
        raise RecordError("missing_field", f"'{name}' missing or empty")
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f"'{name}' is {_json_type(messages)}, not a list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", f"{name}[{i}] is {_json_type(msg)}, not an object")
        role = require_string(msg.get("role"), f"{name}[{i}].role")
        if role not in ROLES:
            raise RecordError("missing_field", f"{name}[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": require_string(msg.get("content"), f"{name}[{i}].content")})
    return out


def preference_parts(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a preference record. `prompt` is a string (one user
    turn) or ChatML messages ending with the user's; `chosen`/`rejected` a string or one assistant message."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif prompt is None or isinstance(prompt, list):
        messages = _message_list(prompt, "prompt")
        if messages[-1]["role"] != "user":
            raise RecordError("missing_field", "the last message of 'prompt' must be the user's")
    else:
        raise RecordError("wrong_type", f"'prompt' is {_json_type(prompt)}, not a string or a list of messages")
    return messages, _reply(record.get("chosen"), "chosen"), _reply(record.get("rejected"), "rejected")


def _reply(value: Any, name: str) -> str:
    if isinstance(value, list):
        messages = _message_list(value, name)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RecordError("wrong_type", f"'{name}' as messages must be one assistant message")
        return messages[0]["content"]
    return require_string(value, name)


def preference_example(messages: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, str]:
    """The prepared pair: the prompt rendered up to the assistant's turn, each reply closed by <|im_end|>."""
    prompt = "".join(render_turn(m["role"], m["content"]) for m in messages) + f"{IM_START}assistant\n"
    return {"prompt": prompt, "chosen": chosen + IM_END, "rejected": rejected + IM_END}


def example_text(example: dict[str, str]) -> str:
    """Everything an example's tokens are counted over (an SFT example, or a preference pair)."""
    if "prompt" in example:
        return example["prompt"] + example["chosen"] + example["rejected"]
    return example["input"] + example["output"]


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


PAIR_FIELDS = ("prompt", "chosen", "rejected")


class PairsError(ValueError):
    """A prepared preference file has a line that is not a pair; the message names file:line."""


def load_pairs(path: str, limit: int | None = None) -> list[dict[str, str]]:
    """The prepared pairs of a file (`jp-peft data prepare --format preference` writes them), each checked:
    what the dpo stage trains on, and what the hf backend checks at plan time."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PairsError(f"{path}:{line_no}: not JSON ({exc.msg}); prepare it with `jp-peft data prepare "
                                 "--format preference`") from None
            bad = [k for k in PAIR_FIELDS if not isinstance(row.get(k) if isinstance(row, dict) else None, str)]
            if bad:
                raise PairsError(f"{path}:{line_no}: {', '.join(bad)} missing or not a string (a prepared pair has "
                                 "prompt, chosen and rejected strings); prepare it with `jp-peft data prepare "
                                 "--format preference`")
            pairs.append({k: row[k] for k in PAIR_FIELDS})
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise PairsError(f"{path}: no preference pairs; prepare it with `jp-peft data prepare --format preference`")
    return pairs
