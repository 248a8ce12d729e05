"""Qwen2.5-0.5B Japanese LoRA continual learning: import -> data -> CPT -> SFT -> export -> eval.

Local, embedded tiny model on CPU (minutes; the README's main job):
    python experiments/qwen_lora_ja.py --executor local --smoke
The same on NeMo's real Megatron path (NeMo 2.7.3 on CPU: import, LoRA CPT/SFT, merge, exports):
    python experiments/qwen_lora_ja.py --executor local --smoke --backend megatron
Local GPU workstation, real Qwen2.5-0.5B on NeMo Megatron:
    python experiments/qwen_lora_ja.py --executor local cluster.gpus_per_node=8
Slurm (profiles in slurm/*.yaml), a rank sweep, W&B online if WANDB_API_KEY is exported:
    python experiments/qwen_lora_ja.py --executor slurm --slurm-profile h100_pyxis --sweep lora.rank=8,16,32
Show everything that would run, without running it:
    python experiments/qwen_lora_ja.py --executor slurm --slurm-profile h100_pyxis --dryrun
Overrides are dotted `key=value` (spec fields, e.g. cpt.train.max_steps=2000 lora.rank=16;
`train.X`/`data.X` set both stages).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # runs from a checkout even before `pip install -e .`

from jp_peft.spec import SpecError, load_preset  # noqa: E402  (light: no torch, no NeMo)

PRESETS = REPO / "recipes" / "configs"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qwen_lora_ja.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="where the stages run (default: local)")
    parser.add_argument("--smoke", action="store_true",
                        help="embedded tiny Qwen2: the whole pipeline on CPU in minutes (hf backend unless "
                        "--backend megatron, which runs NeMo's real Megatron path on CPU)")
    parser.add_argument("--backend", choices=("megatron", "hf"),
                        help="training engine (default: the preset's; megatron = NeMo, needs CUDA except with --smoke)")
    parser.add_argument("--preset", type=Path, help=f"YAML experiment preset (default: {PRESETS.relative_to(REPO)}/"
                        "qwen25_500m_ja.yaml, or smoke.yaml with --smoke)")
    parser.add_argument("--hf-model", help="a local Hugging Face directory or hub id to train with the hf backend "
                        "(e.g. /models/Qwen2.5-0.5B): a single GPU and no NeMo needed")
    parser.add_argument("--stages", help="comma-separated subset of import,data,cpt,sft,export,eval")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one task chain per value (repeat for a grid), e.g. --sweep lora.rank=8,16,32")
    parser.add_argument("--output-dir", help="where runs go (default: runs/)")
    parser.add_argument("--name", help="experiment name (default: qwen_lora_ja, or smoke with --smoke)")
    parser.add_argument("--slurm-profile", default="local", help="slurm/<name>.yaml or a path (default: local)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    parser.add_argument("--wait", action="store_true", help="slurm: block until every job has finished")
    parser.add_argument("--dryrun", action="store_true", help="print every task's config and executor; run nothing "
                        "and change no file")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = args.preset or PRESETS / ("smoke.yaml" if args.smoke else "qwen25_500m_ja.yaml")
    try:
        values = load_preset(preset)
        overrides = collect_overrides(args)
        backend = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("backend=")),
                       values.get("backend", "megatron"))
        cpu_tier = args.smoke and backend == "megatron" and not has_cuda_device()
        if cpu_tier:
            overrides.append("cluster.accelerator=cpu")  # NeMo's Megatron path on CPU, the tiny model only
        if backend == "megatron" and args.executor == "local" and not args.dryrun and not has_cuda_device() \
                and not cpu_tier:
            print("error: the NeMo Megatron backend needs a CUDA GPU and none was found on this machine.\n"
                  "  try the whole pipeline on CPU:        python experiments/qwen_lora_ja.py --smoke\n"
                  "  NeMo's Megatron path on the tiny model: python experiments/qwen_lora_ja.py --smoke --backend megatron\n"
                  "  train with Hugging Face on this box:  python experiments/qwen_lora_ja.py --backend hf "
                  "--hf-model /path/to/Qwen2.5-0.5B\n"
                  "  see what would run on a GPU:          python experiments/qwen_lora_ja.py --dryrun\n"
                  "  or submit to a GPU cluster:           python experiments/qwen_lora_ja.py --executor slurm "
                  "--slurm-profile <profile>", file=sys.stderr)
            return 2
        from jp_peft.launch import launch

        stages = [s.strip() for s in args.stages.split(",")] if args.stages is not None else None
        if stages is not None and not any(stages):
            raise SpecError("--stages: empty; name at least one of import,data,cpt,sft,export,eval")
        recipes = None
        if backend == "megatron":  # the recipe module composes every NeMo call (imports NeMo: ~15 s)
            from recipes import qwen25_500m_ja as recipes
        return launch(values, overrides, args.sweep, stages, executor=args.executor, profile=args.slurm_profile,
                      dryrun=args.dryrun, wait=args.wait, recipes=recipes, overwrite=args.overwrite)
    except (SpecError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from jp_peft.run_state import RunBusy

        if isinstance(exc, RunBusy):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
