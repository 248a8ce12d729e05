"""lm-eval's scores on the tiny model agree with an independent computation, and an adapter on its
base scores like the merged model."""

from __future__ import annotations

import json

import pytest

from jp_peft.evaluation.tasks import bundled_file

pytestmark = pytest.mark.integration


def _jcqa_items(n):
    lines = bundled_file("jpeft_jcqa", "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def _hand_loglikelihoods(model_dir, items):
    """Per item, per choice: sum of log p(continuation token | everything before it), with the context
    and continuation split the way lm-eval's multiple_choice scores them (joint encoding, split after
    the context's tokens; the target delimiter " " starts the continuation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for item in items:
        choices = [item[f"choice{i}"] for i in range(5)]
        context = f"質問: {item['question']}\n選択肢: {'、'.join(choices)}\n回答:"
        lls = []
        for choice in choices:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            lls.append(sum(logprobs[pos - 1, whole[pos]].item() for pos in range(n_ctx, len(whole))))
        out.append((choices, lls))
    return out


def _argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def test_scores_match_hand_computed_loglikelihoods(jcqa_base, tiny_base):
    items = _jcqa_items(5)
    task = jcqa_base["tasks"]["jpeft_jcqa"]
    assert (task["n"], task["n_total"], task["num_fewshot"]) == (5, 125, 0)
    rows = jcqa_base["samples"]["jpeft_jcqa"]
    assert [r["doc_id"] for r in rows] == list(range(5))

    acc, acc_norm = [], []
    for row, item, (choices, lls) in zip(rows, items, _hand_loglikelihoods(tiny_base, items)):
        assert row["target"] == item["label"]
        assert [a[1] for a in row["arguments"]] == [" " + c for c in choices]
        lm_eval_lls = [resp[0] for resp in row["responses"]]
        assert lm_eval_lls == pytest.approx(lls, abs=1e-4)
        acc.append(float(_argmax(lls) == item["label"]))
        acc_norm.append(float(_argmax([ll / len(c) for ll, c in zip(lls, choices)]) == item["label"]))
        assert (row["acc"], row["acc_norm"]) == (acc[-1], acc_norm[-1])
    assert task["metrics"]["acc"]["value"] == pytest.approx(sum(acc) / 5)
    assert task["metrics"]["acc_norm"]["value"] == pytest.approx(sum(acc_norm) / 5)
    # lm-eval's stderr of a mean: sample standard deviation / sqrt(n)
    mean = sum(acc) / 5
    stderr = (sum((a - mean) ** 2 for a in acc) / 4) ** 0.5 / 5 ** 0.5
    assert task["metrics"]["acc"]["stderr"] == pytest.approx(stderr)


def test_adapter_on_base_scores_like_the_merged_model(jcqa_base, jcqa_run, lora_pair, tiny_base):
    from jp_peft.evaluation.harness import evaluate

    adapter_dir, merged_dir = lora_pair
    with_adapter = evaluate(tiny_base, adapter_dir, **jcqa_run)
    merged = evaluate(merged_dir, **jcqa_run)
    assert with_adapter["adapter"] == str(adapter_dir.resolve()) and merged["adapter"] is None

    def lls(record):
        return [resp[0] for row in record["samples"]["jpeft_jcqa"] for resp in row["responses"]]

    assert lls(with_adapter) == pytest.approx(lls(merged), abs=1e-4)
    for metric in ("acc", "acc_norm"):
        assert (with_adapter["tasks"]["jpeft_jcqa"]["metrics"][metric]["value"]
                == merged["tasks"]["jpeft_jcqa"]["metrics"][metric]["value"])
    # the adapter was applied: the base model's likelihoods are different
    assert max(abs(a - b) for a, b in zip(lls(with_adapter), lls(jcqa_base))) > 1e-2
    # same task, same data: same config hash
    assert (with_adapter["tasks"]["jpeft_jcqa"]["config_sha256"]
            == merged["tasks"]["jpeft_jcqa"]["config_sha256"] == jcqa_base["tasks"]["jpeft_jcqa"]["config_sha256"])


def test_production_task_runs_offline_from_data_dir(tiny_base, tmp_path, jnli_rows):
    """lm-eval's ja_leaderboard_jnli (its prompt, choices and metric) on rows from DATA_DIR, 1-shot."""
    from jp_peft.evaluation.harness import evaluate

    for split in ("validation", "train"):
        path = tmp_path / "ja_leaderboard_jnli" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in jnli_rows), encoding="utf-8")
    record = evaluate(tiny_base, tasks="ja_leaderboard_jnli", data_dir=tmp_path, num_fewshot=1, batch_size=4,
                      device="cpu", samples=True)
    task = record["tasks"]["ja_leaderboard_jnli"]
    assert (task["source"], task["n"], task["n_total"], task["num_fewshot"]) == ("production", 3, 3, 1)
    assert set(task["metrics"]) == {"acc"} and set(task["data_sha256"]) == {"validation", "train"}
    rows = record["samples"]["ja_leaderboard_jnli"]
    context, continuation = rows[0]["arguments"][0]
    assert context.startswith("以下は、タスクを説明する指示")  # the leaderboard's description
    assert context.count("### 応答：") == 2 and continuation == "\n含意"  # one shot + the item; "\n" delimiter
    acc = sum(max(range(3), key=lambda i: r["responses"][i][0]) == r["target"] for r in rows) / 3
    assert task["metrics"]["acc"]["value"] == pytest.approx(acc)
    assert record["data_dir"] == str(tmp_path.resolve())
