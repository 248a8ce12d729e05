"""Characters per token of Qwen2.5's real tokenizer (jp_peft.models.qwen_tokenizer, derived from the npm
package scripts/setup.sh caches) beside the embedded tiny tokenizer's (jp_peft.tiny, a 2,048-entry BPE
trained on the bundled train splits), on the bundled Japanese corpus (cpt.train + cpt.validation) and the
English replay data (replay.train + replay.validation). Writes bench/results/tokenizer_chars_per_token_*.json.

    bash scripts/setup.sh
    python bench/tokenizer_chars_per_token.py

Characters are Unicode code points of each document's "text" (as the JSONL holds it, no normalisation);
tokens are the tokenizer's ids for that text with no special tokens added (neither adds BOS/EOS). The tiny
tokenizer has seen the train splits, so its validation-only numbers are reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from jp_peft.resources import bundled

REPO = Path(__file__).resolve().parents[1]
CORPORA = {
    "ja": ("data/ja/cpt.train.jsonl", "data/ja/cpt.validation.jsonl"),
    "en": ("data/en/replay.train.jsonl", "data/en/replay.validation.jsonl"),
}


def texts(rel: str) -> list[str]:
    with open(bundled(rel), encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def count(tokenizer, docs: list[str]) -> dict:
    started = time.perf_counter()
    tokens = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
    chars = sum(len(d) for d in docs)
    utf8 = sum(len(d.encode("utf-8")) for d in docs)
    return {"documents": len(docs), "chars": chars, "utf8_bytes": utf8, "tokens": tokens,
            "chars_per_token": round(chars / tokens, 4), "bytes_per_token": round(utf8 / tokens, 4),
            "seconds": round(time.perf_counter() - started, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from jp_peft.models.qwen_tokenizer import NPM_PACKAGE, NPM_TOKENIZER_SHA256, NPM_VERSION, ensure_qwen25_tokenizer
    from jp_peft.tiny import ensure_tiny_base

    paths = {"qwen2.5": ensure_qwen25_tokenizer(), "tiny": ensure_tiny_base()}
    tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in paths.items()}
    results: dict = {}
    for name, tok in tokenizers.items():
        results[name] = {"path": str(paths[name]), "len": len(tok), "corpora": {}}
        for corpus, files in CORPORA.items():
            docs = [t for rel in files for t in texts(rel)]
            results[name]["corpora"][corpus] = {
                "all": count(tok, docs), "validation_only": count(tok, texts(files[1])),
                "files": list(files)}
    summary = {corpus: {name: results[name]["corpora"][corpus]["all"]["chars_per_token"] for name in results}
               for corpus in CORPORA}
    for corpus, row in summary.items():
        row["ratio_qwen2.5_over_tiny"] = round(row["qwen2.5"] / row["tiny"], 3)
    stamp = datetime.now(timezone.utc)
    report = {"benchmark": "tokenizer_chars_per_token", "date_utc": stamp.isoformat(timespec="seconds"),
              "qwen2.5_source": {"package": f"{NPM_PACKAGE}@{NPM_VERSION}",
                                 "tokenizer_json_sha256": NPM_TOKENIZER_SHA256},
              "chars_per_token": summary, "results": results,
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"tokenizer_chars_per_token_{stamp:%Y%m%d_%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    for corpus, row in summary.items():
        print(f"{corpus}: qwen2.5 {row['qwen2.5']:.3f} chars/token, tiny {row['tiny']:.3f} chars/token "
              f"(x{row['ratio_qwen2.5_over_tiny']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
