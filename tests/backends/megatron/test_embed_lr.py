"""lora_embed's learning rate on the Megatron backend: the decoupled group follows the schedule at its own scale."""

from types import SimpleNamespace

import pytest
import torch

from jp_peft.backends.megatron.embed_lr import EmbedLearningRate, is_embedding_or_output

pytestmark = pytest.mark.unit


def _optimizer(decoupled_key=True):
    groups = [{"params": [torch.zeros(3)], "lr": 0.004, "is_decoupled_lr": False},
              {"params": [torch.zeros(2)], "lr": 0.004, "is_decoupled_lr": True},
              {"params": [], "lr": 0.0, "is_decoupled_lr": False}]  # an empty group Megatron aligns across ranks
    if not decoupled_key:
        for g in groups:
            del g["is_decoupled_lr"]
    return SimpleNamespace(param_groups=groups)


def test_the_decoupled_group_trains_at_ratio_times_the_scheduled_rate_every_step():
    optimizer = _optimizer()
    callback = EmbedLearningRate(ratio=0.1)
    callback.checked = True  # the membership check needs megatron's parallel state (the CPU engine tests run it)
    trainer = SimpleNamespace(optimizers=[optimizer])
    for scheduled in (0.004, 0.01, 0.002):  # the scheduler moved every group to `scheduled` after the last step
        for g in optimizer.param_groups:
            g["lr"] = scheduled
        callback.on_train_batch_start(trainer, None, None, 0)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * scheduled)
        assert optimizer.param_groups[0]["lr"] == scheduled


def test_an_optimizer_without_megatrons_groups_is_refused():
    callback = EmbedLearningRate(ratio=0.1)
    with pytest.raises(RuntimeError, match="is_decoupled_lr"):
        callback.on_train_batch_start(SimpleNamespace(optimizers=[_optimizer(decoupled_key=False)]), None, None, 0)
    plain = _optimizer()
    plain.param_groups[1]["is_decoupled_lr"] = False
    with pytest.raises(RuntimeError, match="no optimizer group holds the embeddings"):
        callback.on_train_batch_start(SimpleNamespace(optimizers=[plain]), None, None, 0)


def test_megatron_names_of_the_embeddings_and_output_layer():
    assert is_embedding_or_output("module.module.embedding.word_embeddings.weight")
    assert is_embedding_or_output("output_layer.weight")
    assert not is_embedding_or_output("module.decoder.layers.0.mlp.linear_fc1.weight")
