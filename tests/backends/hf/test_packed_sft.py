"""Packed SFT rows (backends/hf/data.py) are several examples side by side, never one long sequence.

The hf trainer's forward_loss gives a packed row a block-diagonal causal mask (packed_attention_mask)
and position ids that restart at each example. Checked in process on the tiny model, with the trainer's
own forward_loss: each example's loss in a packed row equals its loss alone in a row, and changing the
tokens of one example leaves the logits of the others untouched.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jp_peft.backends.hf.data import SFTDataset
from jp_peft.backends.hf.trainer import TrainedStageModule
from jp_peft.spec import LoraSpec, TrainSpec

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[3]
SEQ = 256
# The prepared SFT file's format (the data stage writes {"input": prompt, "output": reply} per line).
EXAMPLES = [("日本の首都はどこですか。", "日本の首都は東京です。"),
            ("次の英文を日本語に訳してください。\n\nThe meeting has been moved to Friday.", "会議は金曜日に変更されました。"),
            ("富士山の高さは？", "富士山の高さは三七七六メートルです。日本で一番高い山です。"),
            ("「ありがとう」を丁寧に言うと？", "「ありがとうございます」です。"),
            ("春の季語を一つ挙げてください。", "桜です。"),
            ("一週間は何日ですか。", "七日です。")]


@pytest.fixture(scope="module")
def packed_setup(tiny_base, tmp_path_factory):
    import json

    from transformers import AutoTokenizer

    SFT = tmp_path_factory.mktemp("sft") / "training.jsonl"
    SFT.write_text("".join(json.dumps({"input": f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
                                       "output": f"{a}<|im_end|>"}, ensure_ascii=False) + "\n"
                           for q, a in EXAMPLES), encoding="utf-8")

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    packed = SFTDataset(str(SFT), tokenizer, SEQ, None, 0, True, pad)
    single = SFTDataset(str(SFT), tokenizer, SEQ, None, 0, False, pad)
    module = TrainedStageModule(str(tiny_base), LoraSpec(dropout=0.1), TrainSpec(precision="32-true"), packed, {})
    module.model.eval()  # no dropout: the comparison is of the forward pass
    # A row with at least three examples: first, middle and last segment are all checked.
    row = next(i for i, r in enumerate(packed.rows) if len(r) >= 3)
    return module, packed, single, row


def batch_of(sample: dict) -> dict:
    return {k: v[None] for k, v in sample.items()}


def only_segment(batch: dict, segment: int) -> dict:
    """The same packed row with labels on one segment only: forward_loss then is that example's loss."""
    labels = batch["labels"].clone()
    labels[batch["segment_ids"] != segment] = -100
    return {**batch, "labels": labels}


@torch.no_grad()
def test_each_example_of_a_packed_row_has_its_own_loss(packed_setup):
    module, packed, single, row = packed_setup
    examples = packed.rows[row]
    batch = batch_of(packed[list(packed.order).index(row)])
    assert sorted(set(batch["segment_ids"][0].tolist()) - {0}) == list(range(1, len(examples) + 1))
    for segment, example in enumerate(examples, start=1):
        alone = batch_of(single[list(single.order).index(example)])
        assert int(alone["segment_ids"].max()) == 1  # one example per row
        packed_loss, packed_count = module.forward_loss(only_segment(batch, segment))
        alone_loss, alone_count = module.forward_loss(alone)
        assert packed_count == alone_count > 0
        # Same tokens, same positions, same keys: only the matmul shapes differ (fp32 summation order).
        assert float(packed_loss) == pytest.approx(float(alone_loss), rel=1e-5, abs=1e-6), segment


@torch.no_grad()
def test_attention_does_not_cross_example_boundaries(packed_setup):
    from jp_peft.backends.hf.data import packed_attention_mask

    module, packed, _, row = packed_setup
    batch = batch_of(packed[list(packed.order).index(row)])
    segments = batch["segment_ids"][0]

    def logits(b):
        return module.model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                            attention_mask=packed_attention_mask(b["segment_ids"], module.model.dtype)).logits

    changed = batch["input_ids"].clone()
    first = segments == 1
    changed[0, first] = (changed[0, first] + 17) % 1000  # other tokens for every position of example 1
    before, after = logits(batch)[0], logits({**batch, "input_ids": changed})[0]
    assert not torch.allclose(before[first], after[first])  # example 1 itself did change
    later = segments > 1
    # Masked keys get weight exp(min - max) = 0 exactly: the other examples' logits are bit for bit the same.
    assert torch.equal(before[later], after[later])
    # and the plain causal mask (what packing without the block-diagonal mask would do) leaks across:
    plain = module.model(input_ids=changed, position_ids=batch["position_ids"]).logits[0]
    plain_before = module.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert not torch.allclose(plain[later], plain_before[later])


def test_positions_restart_at_every_example(packed_setup):
    _, packed, _, row = packed_setup
    sample = packed[list(packed.order).index(row)]
    for segment, example in enumerate(packed.rows[row], start=1):
        where = sample["segment_ids"] == segment
        assert sample["position_ids"][where].tolist() == list(range(len(packed.examples[example][0]) - 1))
        assert sample["input_ids"][where].tolist() == packed.examples[example][0][:-1]
        assert sample["labels"][where].tolist() == packed.examples[example][1][1:]
