"""Build the bundled Japanese preference sample (data/ja/dpo_pref.{train,validation}.jsonl) from the bundled
instruction sample: constructed, not human-labelled (data/README.md says what it is and is not).

    python scripts/make_preference_sample.py        # rewrites the two files; the output is deterministic

Each pair's prompt is a bundled instruction (data/ja/sft_alpaca.*.jsonl, CC0), `chosen` its written answer,
`rejected` one of three constructed failures, chosen by the record's position: a curt Japanese non-answer,
an English non-answer, or the answer to another instruction (off topic). The validation file is built from
the held-out instructions only, so no validation prompt is a training prompt. Every eighth pair writes its
prompt as ChatML messages (the other form the format takes) and every sixth gives chosen/rejected as one
assistant message.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src/jp_peft/resources/data/ja"
CURT = ("知りません。", "自分で調べてください。", "答えたくありません。", "それは分かりません。", "興味がないです。",
        "特にありません。", "面倒なので答えません。", "さあ、どうでしょう。")
ENGLISH = ("I don't know.", "Sorry, I can't answer that.", "Please ask someone else.", "No idea.")
TRAIN_PAIRS, VALIDATION_PAIRS = 240, 48


def pairs(records: list[dict], count: int) -> list[dict]:
    out = []
    for i, rec in enumerate(records[:count]):
        prompt = rec["instruction"] if not rec.get("input") else f"{rec['instruction']}\n\n{rec['input']}"
        kind = i % 3
        if kind == 0:
            rejected = CURT[i // 3 % len(CURT)]
        elif kind == 1:
            rejected = ENGLISH[i // 3 % len(ENGLISH)]
        else:
            rejected = records[(i + 7) % len(records)]["output"]  # another instruction's answer
            if rejected == rec["output"]:
                rejected = CURT[0]
        row = {"prompt": [{"role": "user", "content": prompt}] if i % 8 == 7 else prompt,
               "chosen": rec["output"], "rejected": rejected}
        if i % 6 == 5:
            row["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
            row["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
        out.append(row)
    return out


def main() -> None:
    for split, count in (("train", TRAIN_PAIRS), ("validation", VALIDATION_PAIRS)):
        records = [json.loads(line) for line in (DATA / f"sft_alpaca.{split}.jsonl").read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        rows = pairs(records, count)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (DATA / f"dpo_pref.{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{split}: {len(rows)} pairs, {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
