"""jp-peft: NeMo 2.0 recipes for LoRA continual learning of Qwen2.5-0.5B on Japanese."""

import warnings

__version__ = "0.1.0"

# torch.cuda imports the `pynvml` shim that NeMo's dependencies install and it warns on every
# start-up; it says nothing about jp-peft or the user's run, so keep it out of their logs.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
