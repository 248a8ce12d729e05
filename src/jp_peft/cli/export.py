"""`jp-peft export adapter|nemo|gguf`."""

from __future__ import annotations

import json
import sys


def run_export_command(args) -> int:
    from jp_peft.backends.megatron.nemo_archive import ArchiveError, check_checkpoint_dir

    try:
        check_checkpoint_dir(args.checkpoint)  # before importing NeMo: a wrong path is answered at once
    except ArchiveError as exc:
        print(f"error: --checkpoint: {exc}", file=sys.stderr)
        return 2
    if args.export_command == "nemo":
        from jp_peft.backends.megatron.nemo_archive import write_nemo_archive

        try:
            report = write_nemo_archive(args.checkpoint, args.output)
        except ArchiveError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(report, indent=2))
        return 0
    from nemo.collections import llm

    from jp_peft.backends.megatron.hf_peft import AdapterExportError, register_qwen2_hf_peft_exporter

    register_qwen2_hf_peft_exporter()
    try:
        extra = {"base_model_name_or_path": args.base_model} if args.base_model else {}
        out = llm.export_ckpt(path=args.checkpoint, target="hf-peft", output_path=args.output, overwrite=True,
                              **extra)
    except AdapterExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def run_gguf_command(args) -> int:
    """Exit 2 naming the directory, stage or type before anything is written; 1 when a check fails."""
    from jp_peft.cli.finished_run import stage_spec
    from jp_peft.export.gguf import ConversionError, GGUFError, export_gguf
    from jp_peft.export.parity import ParityError
    from jp_peft.records.layout import MissingRecord
    from jp_peft.spec import SpecError

    try:
        spec = stage_spec(args.run_dir, args.stage)
        gguf = export_gguf(spec, args.stage, tuple(t.strip() for t in args.type.split(",") if t.strip()))
    except (GGUFError, MissingRecord, SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ParityError, ConversionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, info in gguf["files"].items():
        print(f"{name}: {info['path']}")
    return 0
