"""`jp-peft data blend`: the token shares and epochs of a blend of prepared datasets; bad blend files
are refused in one line that names the file and the entry."""

import json
import subprocess
import sys

import pytest

from jp_peft.cli import main
from jp_peft.data.prepare import PrepareConfig
from jp_peft.data.run import prepare

JA = ["東京都は二日、新しい図書館の開館日を発表した。蔵書は約三十万冊で、平日は夜九時まで利用できる。",
      "春の京都は観光客でにぎわう。哲学の道の桜は今年も見事で、川沿いの小道をゆっくり歩く人が多かった。",
      "会議では来年度の予算と新しい事業の進め方について、担当者から詳しい説明があった。"]
EN = ["The library opens at nine and closes at six; on weekends it stays open until eight in the evening.",
      "Spring in Kyoto brings crowds of visitors who walk slowly along the canal under the cherry trees."]


def prepared(tmp_path, tiny_base, name, docs, min_ja_ratio):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return prepare(PrepareConfig(inputs=(str(src),), output_prefix=str(tmp_path / "group" / "data" / name),
                                 tokenizer=str(tiny_base), min_ja_ratio=min_ja_ratio, progress=False))


@pytest.mark.integration
def test_blend_of_prepared_datasets_prints_token_shares_and_epochs(tmp_path, tiny_base):
    ja = prepared(tmp_path, tiny_base, "ja_cpt", JA, 0.3)
    en = prepared(tmp_path, tiny_base, "en_replay", EN, 0.0)
    blend = tmp_path / "blend.yaml"
    blend.write_text("datasets:\n"
                     "  - {name: ja, weight: 0.9, prefix: '{group_dir}/data/ja_cpt_text_document'}\n"
                     "  - {name: en, weight: 0.1, prefix: '{group_dir}/data/en_replay_text_document'}\n")
    # A subprocess: the defect this pins was a segfault, which would take pytest down with it.
    proc = subprocess.run([sys.executable, "-m", "jp_peft.cli", "data", "blend", str(blend), "--group-dir",
                           str(tmp_path / "group"), "--train-tokens", "10000"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(proc.stdout)["datasets"]}
    assert rows["ja"]["token_share"] == 0.9 and rows["en"]["token_share"] == 0.1
    # every document is its tokens plus one EOS
    assert rows["ja"]["tokens_available"] == ja["tokens"] + ja["kept"]
    assert rows["en"]["tokens_available"] == en["tokens"] + en["kept"]
    assert rows["ja"]["epochs"] == round(9000 / rows["ja"]["tokens_available"], 4)
    assert rows["en"]["epochs"] == round(1000 / rows["en"]["tokens_available"], 4)


@pytest.mark.unit
@pytest.mark.parametrize("text, message", [
    ("- {name: ja, weight: 1, prefix: x_text_document}\n", "expected a mapping with a 'datasets:' list, got list"),
    ("42\n", "expected a mapping with a 'datasets:' list, got int"),
    ("datasets:\n  - {name: ja, wieght: 1, prefix: x_text_document}\n", "datasets[0].wieght: unknown field; did you mean 'weight'?"),
    ("datasets:\n  - ja_text_document\n", "datasets[0]: expected a mapping (name, weight, prefix), got str"),
    ("datasets: [\n", ":2: invalid YAML"),
])
def test_bad_blend_file_exits_2_naming_file_and_entry(tmp_path, capsys, text, message):
    blend = tmp_path / "blend.yaml"
    blend.write_text(text)
    assert main(["data", "blend", str(blend)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blend}") and message in err and err.count("\n") == 1  # one line
