"""Extract real Japanese prose from Debian's manpages-ja into JSONL, for data-pipeline benchmarks.

    apt-get install manpages-ja
    python bench/debian_ja_corpus.py --output /tmp/manpages_ja.jsonl [--repeat 4]

Each document is one section (.SH) of one man page with the roff markup removed. The text is
DFSG-free (see /usr/share/doc/manpages-ja/copyright); it is extracted at benchmark time and
never committed. --repeat N writes the corpus N times (exact duplicates: the pipeline's dedup
then has real work) for larger benchmark inputs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

MAN_ROOT = Path("/usr/share/man/ja")
_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ESCAPES = [(re.compile(r"\\[-]"), "-"), (re.compile(r"\\&|\\/|\\,|\\\^|\\\||\\c|\\:"), ""),
            (re.compile(r"\\\(em|\\\(en"), "—"), (re.compile(r"\\e"), r"\\\\"), (re.compile(r"\\ "), " "),
            (re.compile(r"\\\*\(..|\\\*."), ""), (re.compile(r"\\s[+-]?\d"), "")]


def roff_to_text(line: str) -> str:
    line = _FONT.sub("", line)
    for pattern, repl in _ESCAPES:
        line = pattern.sub(repl, line)
    return line.strip()


def sections(path: Path):
    title, current, body = path.name.split(".")[0], None, []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
        for raw in handle:
            raw = raw.rstrip("\n")
            if raw.startswith(".SH"):
                if current and body:
                    yield title, current, body
                current, body = roff_to_text(raw[3:].strip().strip('"')), []
            elif raw.startswith((".\\\"", "'\\\"")):
                continue
            elif raw.startswith("."):
                macro, _, rest = raw.partition(" ")
                if macro in (".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB") and rest:
                    body.append(roff_to_text(rest.replace('"', "")))
            elif current:
                text = roff_to_text(raw)
                if text:
                    body.append(text)
    if current and body:
        yield title, current, body


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    pages = sorted(MAN_ROOT.glob("man*/*.gz"))
    if not pages:
        print("error: no Japanese man pages: apt-get install manpages-ja", file=sys.stderr)
        return 2
    docs = []
    for page in pages:
        for title, section, body in sections(page):
            text = "\n".join(body)
            if len(text) >= 40:
                docs.append({"text": f"{title}: {section}\n{text}", "source": f"manpages-ja:{page.name}"})
    with open(args.output, "w", encoding="utf-8") as handle:
        for _ in range(args.repeat):
            for doc in docs:
                handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    size = Path(args.output).stat().st_size
    print(f"{len(docs)} documents x {args.repeat} from {len(pages)} pages: {size / 1e6:.1f} MB -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
