"""Spec resolution, in one place: presets, blend files, dotted overrides, sweeps, placeholders, paths.

    values = load_preset("smoke")                       # a preset name or a YAML path
    spec = resolve_spec(values, ["lora.rank=16"])       # overrides, placeholders, absolute paths, validated
    variants = parse_sweep(["lora.rank=8,16"])          # [["lora.rank=8"], ["lora.rank=16"]]

Placeholders ({group_dir}, {run_dir}, {bundled}, {repo}) are expanded by `resolve_spec` only
(jp_peft.resources says what each means); relative data paths become absolute, since stages run
in other directories (NeMo-Run job dirs, Slurm nodes).
"""

from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from typing import Any

from jp_peft.resources import bundled, placeholder_values, presets_dir
from jp_peft.spec.fields import ExperimentSpec, SpecError, experiment_from_dict
from jp_peft.spec.stages import DEFAULT_STAGES, STAGES, TRAINED_STAGES

# The stages `train.X=` and `data.X=` set: the trained stages a run has by default (cpt, sft). An optional
# stage's fields are its own (`dpo.train.lr=5e-6`): its data section has other fields, and its learning rate
# is of another order.
SHORTHAND_STAGES = tuple(s for s in TRAINED_STAGES if s in DEFAULT_STAGES)

def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict, in place.

    `train.X=...` and `data.X=...` are shorthands that set the field in cpt and sft (SHORTHAND_STAGES).
    """
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = _parse_value(raw)
        parts = key.strip().split(".")
        targets = [[stage] + parts for stage in SHORTHAND_STAGES] if parts[0] in ("train", "data") else [parts]
        for target in targets:
            node = values
            for part in target[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise SpecError(f"override {item!r}: {part} is not a section")
            node[target[-1]] = value
    return values


def _parse_value(raw: str) -> Any:
    """YAML scalars, plus the floats YAML 1.1 reads as strings (`1e-4`)."""
    import yaml

    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML file path, or a bundled preset by name (`smoke`, `qwen25_500m_ja`, or `smoke.yaml`)."""
    path = Path(name_or_path)
    if path.is_file() or "/" in str(name_or_path):
        return path
    named = presets_dir() / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if named.is_file():
        return named
    raise SpecError(f"--preset: {str(name_or_path)!r} is neither a file nor a bundled preset (bundled: "
                    f"{', '.join(preset_names())})")


def load_preset(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML preset (a bundled preset's name, or a path); `blend: path.yaml` entries are inlined."""
    import yaml

    path = preset_path(path)
    if not path.is_file():
        raise SpecError(f"--preset: {path} does not exist or is not a file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: invalid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text") from None
    if not isinstance(values, dict):
        raise SpecError(f"{path}: a preset is a mapping of spec fields, got a {type(values).__name__}")
    inline_blend_files(values)
    return values


def inline_blend_files(values: dict[str, Any]) -> None:
    """`cpt.data.blend: path.yaml` (in a preset or as an override) -> the file's datasets; relative
    paths resolve from the current directory, then from the bundled files (`data/blends/...`)."""
    for stage in TRAINED_STAGES:
        section = values.get(stage)
        data = section.get("data") if isinstance(section, dict) else None
        if isinstance(data, dict) and isinstance(data.get("blend"), str):
            given = blend = Path(data["blend"])
            if not blend.is_absolute() and not blend.exists():
                blend = bundled(str(blend))  # data/blends/ja90_en10.yaml: the bundled blend
            if not blend.is_file():
                raise SpecError(f"{stage}.data.blend: blend file {given} does not exist")
            data["blend"] = load_blend(blend, field=f"{stage}.data.blend")


def load_blend(path: str | os.PathLike, field: str = "data.blend") -> list[dict[str, Any]]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{field}: blend file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping with a 'datasets:' list, got {type(doc).__name__}")
    datasets = doc.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise SpecError(f"{path}: expected a non-empty 'datasets:' list")
    return datasets


def read_spec_file(path: str | os.PathLike) -> ExperimentSpec:
    """A resolved spec written as JSON (a run's spec.json, `jp-peft stage --spec`). Anything that keeps it
    from being one is a SpecError naming the file (and the line, or the field)."""
    import json

    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        return experiment_from_dict(values)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:  # not a spec's shape (e.g. a list)
        raise SpecError(f"{path}: not a jp-peft spec ({exc})") from None


def parse_sweep(items: list[str]) -> list[list[str]]:
    """`lora.rank=8,16` `train.lr=1e-4,2e-4` -> the cartesian product as override lists."""
    axes = []
    for item in items:
        if "=" not in item:
            raise SpecError(f"--sweep {item!r}: expected key=v1,v2,...")
        key, values = item.split("=", 1)
        choices = [v for v in values.split(",") if v != ""]
        if not choices:
            raise SpecError(f"--sweep {item!r}: no values")
        repeated = sorted({v for v in choices if choices.count(v) > 1})
        if repeated:
            raise SpecError(f"--sweep {item!r}: {', '.join(repeated)} given twice (two runs of one variant would "
                            "write the same directory)")
        axes.append([f"{key}={v}" for v in choices])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def variant_suffix(overrides: list[str]) -> str:
    """`lora.rank=8` -> `rank8`: short, readable names for W&B and directories."""
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        parts.append(f"{key.split('.')[-1]}{value}".replace("/", "_"))
    return "-".join(parts)


def _expand_paths(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_paths(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_paths(v, mapping) for v in node]
    if isinstance(node, str) and "{" in node:
        for key, value in mapping.items():
            node = node.replace("{" + key + "}", value)
    return node


# The spec's path fields, one owner: made absolute at resolution, listed for the cluster's visibility check.
DATA_FILE_KEYS = ("sft_train", "sft_val", "val_ja", "val_en", "train", "validation")  # train, validation: dpo
DATA_SOURCE_KEYS = ("sft_source", "val_ja_source", "val_en_source", "train_source", "validation_source")


def _map_data_paths(values: dict, change) -> None:
    """Replace every data path of a spec's values (trained stages' data, eval data) with change(field, path)."""
    for stage in TRAINED_STAGES:
        data = values.get(stage, {}).get("data", {})
        for key in DATA_FILE_KEYS:
            if isinstance(data.get(key), str) and data[key]:
                data[key] = change(f"{stage}.data.{key}", data[key])
        for key in DATA_SOURCE_KEYS:
            if data.get(key):
                data[key] = [change(f"{stage}.data.{key}", p) for p in data[key]]
        for entry in data.get("blend", []) or []:
            if isinstance(entry, dict):
                label = f"{stage}.data.blend[{entry.get('name')}]"
                if isinstance(entry.get("prefix"), str) and entry["prefix"]:
                    entry["prefix"] = change(f"{label}.prefix", entry["prefix"])
                entry["source"] = [change(f"{label}.source", p) for p in entry.get("source") or []]
    evaluation = values.get("eval", {})
    if isinstance(evaluation, dict):
        if isinstance(evaluation.get("data_dir"), str) and evaluation["data_dir"]:
            evaluation["data_dir"] = change("eval.data_dir", evaluation["data_dir"])
        if isinstance(evaluation.get("include_path"), list):
            evaluation["include_path"] = [change("eval.include_path", p) if isinstance(p, str) and p else p
                                          for p in evaluation["include_path"]]


def _absolute_data_paths(values: dict, cwd: Path) -> None:
    """Data paths become absolute: tasks run in other directories (NeMo-Run job dirs, Slurm nodes)."""
    def fix(_field: str, path: str) -> str:
        return str(path if Path(path).is_absolute() else (cwd / path).resolve())

    _map_data_paths(values, fix)
    model = values.get("model", {})
    if isinstance(model.get("name"), str) and Path(model["name"]).exists():
        model["name"] = fix("model.name", model["name"])


def job_paths(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """(field, path) for every path the run's jobs read or write: the run directory (output_dir: records,
    checkpoints, exports, W&B), a local model directory, the data files and prefixes of its trained stages (their
    sources when it has the data stage, which reads them), the eval data when it has the eval stage."""
    found = [("output_dir", spec.output_dir)]
    if spec.local_model_dir() is not None:
        found.append(("model.name", str(spec.local_model_dir())))
    used = tuple(f"{stage}." for stage in spec.trained_stages) + (("eval.",) if "eval" in spec.stages else ())

    def collect(field_name: str, path: str) -> str:
        source = field_name.endswith(("_source", ".source"))
        if field_name.startswith(used) and (not source or "data" in spec.stages):
            found.append((field_name, path))
        return path

    _map_data_paths(spec.to_dict(), collect)
    return found


def resolve_spec(values: dict, overrides: list[str], cwd: Path | None = None) -> ExperimentSpec:
    """The validated spec of a preset's values with `overrides` applied, its placeholders expanded and its
    data paths absolute (relative ones from `cwd`, default the current directory)."""
    cwd = cwd or Path.cwd()
    values = apply_overrides(copy.deepcopy(values), overrides)
    inline_blend_files(values)  # `cpt.data.blend=my_blend.yaml` on the command line, as in a preset
    if not isinstance(values.get("output_dir", "runs"), str) or not values.get("output_dir", "runs"):
        raise SpecError(f"output_dir: expected a directory path, got {values.get('output_dir')!r}")
    output_dir = str((cwd / values.get("output_dir", "runs")).resolve())
    values["output_dir"] = output_dir
    name = values.get("name", "qwen_lora_ja")
    group = values.get("group") or name
    for field_name, value in (("name", name), ("group", group), ("output_dir", values["output_dir"])):
        if not isinstance(value, str) or value in ("", ".", "..") or (field_name != "output_dir" and "/" in value):
            raise SpecError(f"{field_name}: expected a name (a directory under output_dir), got {value!r}")
    values = _expand_paths(values, {"group_dir": str(Path(output_dir) / group), "run_dir": str(Path(output_dir) / name),
                                    **placeholder_values()})
    _absolute_data_paths(values, cwd)
    return experiment_from_dict(values)


def with_stages(overrides: list[str], stages: list[str] | None) -> list[str]:
    """`--stages a,b` as an override, each name checked against the stage table."""
    if not stages:
        return overrides
    for name in stages:
        if name not in STAGES:
            raise SpecError(f"--stages: {name!r} is not one of {', '.join(STAGES)}")
    return [*overrides, f"stages=[{','.join(stages)}]"]
