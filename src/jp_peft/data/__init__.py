"""Japanese data pipeline: read, validate, clean, deduplicate, tokenise, write."""

import logging
import warnings

# Importing megatron.core on a machine without Transformer Engine/Apex/CUDA warns about fused
# kernels and unified memory that data preparation never uses, and megatron.core.utils logs an
# "experimental function has reached end of life" note; keep those out of its output.
_MEGATRON_IMPORT_NOISE = ("Transformer Engine and Apex are not installed", "Failed to create unified memory mempool")


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported without the irrelevant start-up warnings."""
    utils_logger = logging.getLogger("megatron.core.utils")
    level = utils_logger.level
    utils_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for message in _MEGATRON_IMPORT_NOISE:
                warnings.filterwarnings("ignore", message=message, category=UserWarning)
            from megatron.core.datasets import indexed_dataset
    finally:
        utils_logger.setLevel(level)
    return indexed_dataset
