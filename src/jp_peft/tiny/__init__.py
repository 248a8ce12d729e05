"""The embedded default model: a tiny Qwen2 and its tokenizer, built from the bundled samples.

The build is deterministic and cached: `ensure_tiny_base()` returns the directory of a
Hugging Face model (config, safetensors, tokenizer) that later runs reuse.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

from jp_peft.resources import bundled

DATA_DIR = bundled("data")
# Files the tokenizer and the base model are trained on (train splits only: validation
# files stay unseen so that perplexities measured on them are honest).
TOKENIZER_FILES = ("ja/cpt.train.jsonl", "en/replay.train.jsonl", "ja/sft_alpaca.train.jsonl")
BASE_FILES = {"ja/cpt.train.jsonl": 0.35, "en/replay.train.jsonl": 0.65}
BUILD_VERSION = "2"

# Qwen2.5's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY = dict(vocab_size=2048, hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
            intermediate_size=512, max_position_embeddings=1024)
PRETRAIN = dict(steps=150, seq_length=256, batch_size=4, lr=3e-3, warmup=30, seed=0)


def cache_root() -> Path:
    return Path(os.environ.get("JP_PEFT_CACHE", Path.home() / ".cache" / "jp-peft"))


def _build_key() -> str:
    digest = hashlib.sha256(BUILD_VERSION.encode())
    digest.update(json.dumps([TINY, PRETRAIN, BASE_FILES, TOKENIZER_FILES, QWEN_SPLIT], sort_keys=True).encode())
    for rel in sorted(set(TOKENIZER_FILES) | set(BASE_FILES)):
        digest.update((DATA_DIR / rel).read_bytes())
    return digest.hexdigest()[:12]


def _texts(rel: str) -> list[str]:
    with open(DATA_DIR / rel, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    out = []
    for row in rows:
        if "text" in row:
            out.append(row["text"])
        else:  # alpaca rows give the tokenizer instruction-style text too
            out.append("\n".join(str(row.get(k, "")) for k in ("instruction", "input", "output")))
    return out


def build_tokenizer(out_dir: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [text for rel in TOKENIZER_FILES for text in _texts(rel)]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = TINY["max_position_embeddings"]
    fast.save_pretrained(out_dir)
    return fast


def _token_stream(tokenizer, rel: str) -> list[int]:
    ids: list[int] = []
    for text in _texts(rel):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return ids


def pretrain_base(tokenizer, out_dir: Path) -> dict:
    """Brief full-parameter pre-training on the bundled English+Japanese text (mostly English,
    so that the Japanese continual pre-training has something to teach)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(PRETRAIN["seed"])
    rng = random.Random(PRETRAIN["seed"])
    vocab = math.ceil(len(tokenizer) / 64) * 64
    config = Qwen2Config(**{**TINY, "vocab_size": vocab}, tie_word_embeddings=True, rope_theta=10000.0,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    streams = {rel: torch.tensor(_token_stream(tokenizer, rel)) for rel in BASE_FILES}
    seq, batch = PRETRAIN["seq_length"], PRETRAIN["batch_size"]
    optim = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    steps, warmup = PRETRAIN["steps"], PRETRAIN["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    names, weights = list(BASE_FILES), list(BASE_FILES.values())
    losses = []
    model.train()
    for step in range(steps):
        rows = []
        for _ in range(batch):
            stream = streams[rng.choices(names, weights)[0]]
            start = rng.randrange(0, len(stream) - seq - 1)
            rows.append(stream[start:start + seq + 1])
        block = torch.stack(rows)
        loss = model(input_ids=block[:, :-1], labels=block[:, :-1].clone()).loss  # HF shifts labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    model.save_pretrained(out_dir, safe_serialization=True)
    return {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "params": sum(p.numel() for p in model.parameters())}


def tiny_base_path() -> Path:
    """Where the tiny base of this checkout lives (built or not): the key hashes its recipe and data."""
    return cache_root() / f"tiny-qwen2-{_build_key()}"


# The Hugging Face config values of the tiny base that a NeMo model config must mirror (pretrain_base
# builds it with these; the vocabulary is padded to a multiple of 64 and is 2048 for this tokenizer).
TINY_HF_CONFIG = {**TINY, "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                  "initializer_range": 0.02}


def ensure_tiny_base(log=print) -> Path:
    """Directory of the cached tiny base (tokenizer + model), building it if needed."""
    import fcntl

    target = tiny_base_path()
    key = target.name.removeprefix("tiny-qwen2-")
    if (target / "jp_peft_base.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".tiny-qwen2-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two stages or tests starting at once build it once
        if (target / "jp_peft_base.json").exists():
            return target
        tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        log(f"building the tiny Qwen2 base in {target} (once; later runs reuse it)")
        tokenizer = build_tokenizer(tmp)
        info = pretrain_base(tokenizer, tmp)
        info.update(key=key, seconds=round(time.perf_counter() - started, 1), tiny=TINY, pretrain=PRETRAIN)
        (tmp / "jp_peft_base.json").write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, target)
        log(f"tiny base built in {info['seconds']} s: {info['params']:,} parameters, "
            f"loss {info['loss_first']} -> {info['loss_last']}")
    return target
