"""A resumed fine-tuning stage trains the batches it has left, each once.

NeMo's fine-tuning loader (FineTuningDataModule: dataloader_type="batch") is sized to the global batches
that are left: MegatronPretrainingBatchSampler.__len__ counts from consumed_samples
(nemo/collections/common/data/data_samplers.py). Lightning, resuming mid-epoch, adds the checkpoint's
in-epoch batch count to the fetcher (lightning/pytorch/loops/training_epoch_loop.py, on_run_start:
`data_fetcher.fetched += self.batch_progress.current.ready`), so it counts those batches twice, ends the
epoch early and starts a new one, whose iterator starts again at the restored consumed_samples: the first
resumed global batch is trained twice. Seen on the tiny model, resumed after step 5 of 8: samples 40-47
trained at steps 6 and 7, every later step one batch behind, the losses off from step 7.

The loader already starts where the checkpoint stopped, so its epoch is counted from zero here; the run's
total batch count (the validation schedule with check_val_every_n_epoch=None) is left as restored.
NeMo's pre-training loader (MegatronPretrainingSampler in nemo/lightning/data.py) is sized to the whole
dataset, so Lightning's count is right for it and it is left alone.
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl

# the upstream line this callback gets past; if Lightning changes it, so must this
LIGHTNING_LINE = "data_fetcher.fetched += self.batch_progress.current.ready"


def _check_upstream() -> None:
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    if LIGHTNING_LINE not in inspect.getsource(_TrainingEpochLoop.on_run_start):
        raise RuntimeError(
            "jp_peft.backends.megatron.resumed_epoch: Lightning's _TrainingEpochLoop.on_run_start no longer "
            f"contains {LIGHTNING_LINE!r}; check whether a resumed fine-tuning epoch still counts its "
            "batches twice before running with this Lightning version")


class ResumedEpochFromZero(pl.Callback):
    def __init__(self):
        _check_upstream()

    def on_train_start(self, trainer, pl_module):
        from nemo.collections.common.data.data_samplers import MegatronPretrainingBatchSampler

        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.current.completed == 0:
            return  # a fresh start, or a resume at an epoch boundary
        loader = trainer.train_dataloader
        if isinstance(getattr(loader, "batch_sampler", None), MegatronPretrainingBatchSampler):
            progress.current.reset()  # the loop's reset_on_restart then sets ready = completed = 0
