"""Data preparation shows its progress in a log (stderr not a terminal): plain lines, one per interval."""

import json
import re
import subprocess
import sys

import pytest

LINE = re.compile(r"^prepare out: ([\d,]+) read, ([\d,]+) kept, ([\d,]+) rejected, [\d.,]+ of [\d.,]+ MB \(\d+%\), "
                  r"[\d.]+ MB/s, elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|\?)$")
DOC = "東京都は二日、新しい図書館の開館日を発表した。蔵書は約三十万冊で、平日は夜九時まで利用できる。"


@pytest.mark.integration
def test_progress_lines_appear_in_a_log_with_counts_rate_and_eta(tmp_path, tiny_base):
    src = tmp_path / "docs.jsonl"
    rows = [{"text": f"{i}番目。{DOC}{i * 7 % 13}人。"} for i in range(6000)] + [{"text": "short"}] * 20
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "data", "prepare", "--input", str(src), "--tokenizer",
                           str(tiny_base), "--output-prefix", str(tmp_path / "out"), "--no-near-dedup",
                           "--progress-interval", "0.05"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr  # no terminal redraws in a log file
    lines = [m for m in map(LINE.match, proc.stderr.splitlines()) if m]
    assert len(lines) >= 2, proc.stderr[-2000:]
    counts = [tuple(int(g.replace(",", "")) for g in m.groups()[:3]) for m in lines]
    assert all(read == kept + rejected for read, kept, rejected in counts)
    assert [c[0] for c in counts] == sorted(c[0] for c in counts)  # it advances
