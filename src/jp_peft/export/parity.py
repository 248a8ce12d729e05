"""Logit parity between the forms one model takes: Hugging Face, PEFT adapter on its base, NeMo/Megatron.

Every check runs the models in fp32 on the same token ids and reports max |logit difference| and
the share of positions whose argmax agrees; `check` turns a comparison into a pass/fail record
with the tolerance and the reason for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# fp32: the same weights through two implementations differ only by summation order.
FP32_ATOL = 1e-4


def random_ids(vocab_size: int, batch: int = 2, length: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def held_out_ids(val_prefix: str, length: int = 64, n: int = 8) -> torch.Tensor:
    """The first n blocks of a held-out indexed dataset (real text, the same every time)."""
    from jp_peft.data.blocks import EvalBlocks

    blocks = EvalBlocks(val_prefix, length, n)
    return torch.stack([blocks[i]["input_ids"] for i in range(len(blocks))])


def prompt_ids(hf_dir: str | Path) -> tuple[list[str], list[list[int]]]:
    """The bundled Japanese prompts (evaluation/tasks/prompts) and their token ids by the model's HF tokenizer:
    what the GGUF and vLLM checks feed both sides."""
    from transformers import AutoTokenizer

    from jp_peft.evaluation.generation import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = [p["prompt"] for p in load_prompts()]
    return texts, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def hf_logits(model_dir: str | Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def peft_logits(adapter_dir: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """The adapter on the base its adapter_config.json names, as a user would load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_name = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_name, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=ids).logits.float()


def check(name: str, a: torch.Tensor, b: torch.Tensor, atol: float, reason: str) -> dict:
    diff = float((a - b).abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return {"check": name, "max_abs_diff": diff, "argmax_agreement": agree, "atol": atol, "ok": diff <= atol,
            "tolerance_reason": reason, "positions": int(a.shape[0] * a.shape[1])}


def quantized_check(name: str, merged: torch.Tensor, trained: torch.Tensor, base_gap: float) -> dict:
    """QLoRA's parity figure: the adapter merged into the full-precision base against the 4-bit model it was
    trained as. They differ by the base's own quantization error, so the bound is measured, not fixed:
    twice the max |logit diff| between the base in full precision and in 4-bit (`base_gap`) on the same ids."""
    atol = 2 * base_gap + FP32_ATOL
    return {**check(name, merged, trained, atol, f"the full-precision merge differs from the 4-bit training model "
                    f"by about the base's own NF4 error (full vs 4-bit base: max |logit diff| {base_gap:.3e}); "
                    "bound: twice that"), **{k: v for k, v in logit_agreement(merged, trained).items()
                                             if k in ("mean_kl", "max_kl", "top1_agreement")}, "base_gap": base_gap}


class ParityError(RuntimeError):
    """An exported or imported model does not reproduce the model it came from."""


def require(checks: list[dict], where: str) -> None:
    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise ParityError(f"{where}: " + "; ".join(
            f"{c['check']}: max |logit diff| {c['max_abs_diff']:.3e} > {c['atol']:.1e}" for c in failed))


def logit_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How closely two models' logits (..., vocab) on the same ids agree, in float64 so the comparison
    adds no rounding of its own: max |a - b|, the mean and max KL(softmax a || softmax b) over positions,
    and the share of positions whose argmax agrees (`check` is the pass/fail form of the first)."""
    a64, b64 = a.double(), b.double()
    log_p, log_q = torch.log_softmax(a64, -1), torch.log_softmax(b64, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"max_abs_diff": float((a64 - b64).abs().max()), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
            "positions": int(kl.numel())}
