"""`jp-peft export adapter|nemo`."""

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
