"""`jp-peft run` (and experiments/qwen_lora_ja.py, the same entry point): one YAML spec -> a NeMo-Run
experiment of stages on the local or Slurm executor. Imports nothing heavy before it must."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from jp_peft.spec import BACKENDS, STAGES, SpecError, load_preset, preset_names

DESCRIPTION = """Qwen2.5-0.5B Japanese LoRA continual learning: import -> data -> CPT -> SFT -> export -> eval.

Local, embedded tiny model on CPU (minutes; the README's main job):
    jp-peft run --executor local --smoke
The same on NeMo's real Megatron path (NeMo 2.7.3 on CPU: import, LoRA CPT/SFT, merge, exports):
    jp-peft run --executor local --smoke --backend megatron
Local GPU workstation, real Qwen2.5-0.5B on NeMo Megatron:
    jp-peft run --executor local cluster.gpus_per_node=8
Slurm (profiles in slurm/*.yaml), a rank sweep, W&B online if WANDB_API_KEY is exported:
    jp-peft run --executor slurm --slurm-profile h100_pyxis --sweep lora.rank=8,16,32
Show everything that would run, without running it:
    jp-peft run --executor slurm --slurm-profile h100_pyxis --dryrun
Overrides are dotted `key=value` (spec fields, e.g. cpt.train.max_steps=2000 lora.rank=16;
`train.X`/`data.X` set both stages). Every field, its type, default and meaning: jp-peft spec fields
"""


def parse_args(argv=None, prog: str = "jp-peft run") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="where the stages run (default: local)")
    parser.add_argument("--smoke", action="store_true",
                        help="embedded tiny Qwen2: the whole pipeline on CPU in minutes (hf backend unless "
                        "--backend megatron, which runs NeMo's real Megatron path on CPU)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="training engine (default: the preset's; megatron = NeMo, needs CUDA except with --smoke)")
    parser.add_argument("--preset", help="a bundled preset's name (" + ", ".join(preset_names()) + ") or a YAML "
                        "file (default: qwen25_500m_ja, or smoke with --smoke)")
    parser.add_argument("--hf-model", help="a local Hugging Face directory or hub id to train with the hf backend "
                        "(e.g. /models/Qwen2.5-0.5B): a single GPU and no NeMo needed")
    parser.add_argument("--stages", help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one task chain per value (repeat for a grid), e.g. --sweep lora.rank=8,16,32")
    parser.add_argument("--output-dir", help="where runs go (default: runs/)")
    parser.add_argument("--name", help="experiment name (default: qwen_lora_ja, or smoke with --smoke)")
    parser.add_argument("--slurm-profile", default="local", help="slurm/<name>.yaml or a path (default: local)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    parser.add_argument("--wait", action="store_true", help="slurm: block until every job has finished")
    parser.add_argument("--dryrun", action="store_true", help="print the resolved spec, then each task: would run "
                        "or done, its executor, its composed config; run nothing and change no file")
    parser.add_argument("--verbose", action="store_true", help="with --dryrun: executors in full, the spec in every "
                        "task, the sbatch scripts")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a run over when its directory holds a run of another spec (default: the same "
                        "spec resumes it, a different one is refused)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="spec overrides, e.g. lora.rank=16")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the flags


def has_cuda_device() -> bool:
    """Without importing torch: an NVIDIA driver with a device node."""
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidiactl").exists()


def collect_overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"backend={args.backend}")
    if args.hf_model:
        overrides += ["backend=hf", f"model.name={args.hf_model}", "model.tiny=false"]
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.name:
        overrides.append(f"name={args.name}")
    if args.no_wandb:
        overrides.append("wandb.enabled=false")
    return overrides


def main(argv=None, prog: str = "jp-peft run") -> int:
    args = parse_args(argv, prog)
    try:
        values = load_preset(args.preset or ("smoke" if args.smoke else "qwen25_500m_ja"))
        overrides = collect_overrides(args)
        name = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("backend=")),
                    values.get("backend", "megatron"))
        from jp_peft.backends import backend_of

        backend = backend_of(name)
        cuda = has_cuda_device()
        overrides += backend.local_overrides(args.smoke, cuda)
        refusal = backend.cannot_run_here(args.smoke, cuda) if args.executor == "local" and not args.dryrun else None
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
        from jp_peft.run.launch import launch

        stages = [s.strip() for s in args.stages.split(",")] if args.stages is not None else None
        if stages is not None and not any(stages):
            raise SpecError("--stages: empty; name at least one of " + ",".join(STAGES))
        return launch(values, overrides, args.sweep, stages, executor=args.executor, profile=args.slurm_profile,
                      dryrun=args.dryrun, wait=args.wait, overwrite=args.overwrite, verbose=args.verbose)
    except (SpecError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from jp_peft.run.locks import RunBusy

        if isinstance(exc, RunBusy):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
