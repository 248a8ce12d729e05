"""Build the bundled continuation tasks (`jpeft_ja_cont`, `jpeft_en_cont`) from held-out bundled text.

Each item is a passage of a validation document (`data/ja/cpt.validation.jsonl`,
`data/en/replay.validation.jsonl`: never in a training file, never seen by the tiny base or its
tokenizer) cut short before the end of one of its sentences; the choices are the true rest of that
sentence and the same-length sentence endings of other validation documents. A model that has learnt
the language scores the true continuation above the others; a model that forgets it drifts to chance.

Deterministic: the same bundled files give the same task files byte for byte
(`python -m jp_peft.evaluation.continuation_tasks` rewrites them; tests/evaluation/test_continuation_tasks.py
checks the committed files against this module's output). tasks/README.md documents the construction.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jp_peft.data.normalize import normalize_text
from jp_peft.resources import bundled

SEED = 25


@dataclass(frozen=True)
class Construction:
    """How one task's items are cut from its documents."""

    task: str
    source: str  # bundled validation file (resources/data/...)
    lang: str  # "ja": continuation in characters; "en": in words
    continuation: int  # characters (ja) or words (en) before a sentence end
    min_prefix: int  # characters of passage before the continuation, at least
    per_doc: int  # items per document, at most (the sentence ends nearest the document's end)
    choices: int  # the true continuation + choices-1 distractors from other documents
    foreign: int  # of the distractors, how many are sentence endings of the other language's validation documents
    fewshot_docs: int  # the first documents (in file order) give the few-shot pool, the rest the test split


JA = Construction("jpeft_ja_cont", "data/ja/cpt.validation.jsonl", "ja", continuation=12, min_prefix=60,
                  per_doc=2, choices=4, foreign=1, fewshot_docs=10)
EN = Construction("jpeft_en_cont", "data/en/replay.validation.jsonl", "en", continuation=4, min_prefix=200,
                  per_doc=4, choices=4, foreign=0, fewshot_docs=4)
CONSTRUCTIONS = (JA, EN)

_SENTENCE_END = {"ja": re.compile(r"[。!?](?=[^。!?)」』]|$)"), "en": re.compile(r"[.!?][\"')]?(?=\s|$)")}


def documents(c: Construction) -> list[str]:
    """The source's texts, cleaned as `jp-peft data prepare` cleans them (NFKC, spaces)."""
    with open(bundled(c.source), encoding="utf-8") as handle:
        return [normalize_text(json.loads(line)["text"]) for line in handle if line.strip()]


def _cuts(c: Construction, doc: str) -> list[tuple[str, str]]:
    """(passage, continuation) pairs of one document: the continuation ends a sentence, the passage is
    everything before it; the `per_doc` sentence ends nearest the document's end with a long enough passage."""
    pairs = []
    for match in _SENTENCE_END[c.lang].finditer(doc):
        end = match.end()
        if c.lang == "ja":
            start = end - c.continuation
        else:  # the last `continuation` words of the sentence, the space before them kept in the passage
            words = list(re.finditer(r"\S+", doc[:end]))
            if len(words) <= c.continuation:
                continue
            start = words[-c.continuation].start()
        passage = doc[:start].rstrip() if c.lang == "en" else doc[:start]
        if len(passage) >= c.min_prefix and "\n" not in doc[start:end]:
            pairs.append((passage, doc[start:end]))
    return pairs[-c.per_doc:] if c.per_doc else pairs


def _foreign_endings(c: Construction) -> list[str]:
    """Sentence endings of the other language's validation documents, as text to cut to a length."""
    other = next(o for o in CONSTRUCTIONS if o.lang != c.lang)
    ends = []
    for doc in documents(other):
        ends += [doc[:m.end()] for m in _SENTENCE_END[other.lang].finditer(doc)][-2:]
    return ends


def _byte_suffix(text: str, size: int) -> str:
    """The longest end of `text` of at most `size` UTF-8 bytes (one character at least), no leading space:
    the other language's distractor is as long in bytes as the true continuation, so neither acc (summed
    log-likelihood) nor acc_norm (per byte) favours it by length."""
    n = 1
    while n < len(text) and len(text[-(n + 1):].encode()) <= size:
        n += 1
    return text[-n:].lstrip()


def build_items(c: Construction) -> dict[str, list[dict]]:
    """{"test": [...], "fewshot": [...]}: items {"id", "doc", "passage", "choice0".., "label"}."""
    docs = documents(c)
    cuts = [_cuts(c, d) for d in docs]
    foreign = _foreign_endings(c) if c.foreign else []
    rng = random.Random(f"{SEED}:{c.task}")
    out: dict[str, list[dict]] = {"test": [], "fewshot": []}
    for split, doc_ids in (("fewshot", range(c.fewshot_docs)), ("test", range(c.fewshot_docs, len(docs)))):
        pool = [(i, cont) for i in doc_ids for _, cont in cuts[i]]  # distractors come from the same split
        prefix = "fs-" if split == "fewshot" else ""
        for i in doc_ids:
            for passage, true in cuts[i]:
                others = sorted({cont for j, cont in pool if j != i and cont != true})
                distractors = rng.sample(others, c.choices - 1 - c.foreign)
                distractors += [_byte_suffix(rng.choice(foreign), len(true.encode())) for _ in range(c.foreign)]
                rng.shuffle(distractors)
                label = len(out[split]) % c.choices  # balanced gold positions, then shuffled with the items
                choices = distractors[:label] + [true] + distractors[label:]
                out[split].append({"doc": i, "passage": passage,
                                   **{f"choice{k}": text for k, text in enumerate(choices)}, "label": label})
        rng.shuffle(out[split])  # --limit N sees a mix of documents and gold positions
        short = c.task.removeprefix("jpeft_").replace("_", "")
        for n, item in enumerate(out[split], 1):
            item["id"] = f"{short}-{prefix}{n:04d}"
        out[split] = [{"id": it["id"], **{k: v for k, v in it.items() if k != "id"}} for it in out[split]]
    return out


def task_yaml(c: Construction) -> str:
    delimiter = "" if c.lang == "ja" else " "
    what = ("Japanese" if c.lang == "ja" else "English")
    unit = "characters" if c.lang == "ja" else "words"
    choices = ", ".join(f"choice{k}" for k in range(c.choices))
    return (f"# {what} passage continuation, {c.choices}-way: the true last {c.continuation} {unit} of a sentence of a\n"
            f"# held-out bundled document ({c.source}) against other documents' sentence endings.\n"
            f"# Generated by `python -m jp_peft.evaluation.continuation_tasks` (do not edit; CC0-1.0).\n"
            f"task: {c.task}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            "    test: test.jsonl\n"
            "    train: fewshot.jsonl\n"
            "test_split: test\n"
            "fewshot_split: train\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{passage}}"\n'
            f'doc_to_choice: "{{{{[{choices}]}}}}"\n'
            "doc_to_target: label\n"
            f'target_delimiter: "{delimiter}"\n'
            'fewshot_delimiter: "\\n\\n"\n'
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
            "  - metric: acc_norm\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
            "metadata:\n"
            "  version: 1.0\n")


def rendered(c: Construction) -> dict[str, str]:
    """file name -> text of one task directory."""
    items = build_items(c)
    lines = {split: "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in rows) for split, rows in items.items()}
    return {f"{c.task}.yaml": task_yaml(c), "test.jsonl": lines["test"], "fewshot.jsonl": lines["fewshot"]}


def write_tasks(root: Path) -> list[Path]:
    """Write every continuation task under root/<task>/; returns the files written."""
    written = []
    for c in CONSTRUCTIONS:
        for name, text in rendered(c).items():
            path = root / c.task / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(str(resources.files("jp_peft.evaluation") / "tasks")),
                        help="the tasks directory (default: this package's bundled tasks, jp_peft/evaluation/tasks)")
    args = parser.parse_args(argv)
    for path in write_tasks(args.output):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
