"""What `jp-peft export gguf` and `jp-peft serve` start from: a finished run directory and one of its trained stages."""

from __future__ import annotations

from pathlib import Path


def stage_spec(run_dir: str, stage: str):
    """The spec of RUN_DIR (its spec.json), refusing a directory without one or a stage it did not train."""
    from jp_peft.records.layout import spec_file_of
    from jp_peft.spec import SpecError, read_spec_file

    spec_path = spec_file_of(Path(run_dir))
    if not spec_path.is_file():
        raise SpecError(f"RUN_DIR: {spec_path} not found (a run directory holds spec.json)")
    spec = read_spec_file(spec_path)
    if stage not in spec.trained_stages:
        raise SpecError(f"--stage: {stage} is not a trained stage of this run ({', '.join(spec.trained_stages)})")
    return spec
