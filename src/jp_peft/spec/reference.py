"""`jp-peft spec fields`: every spec field as a dotted path with its type, default and help.

The help of a field is the comment written above it in spec/fields.py (or at the end of its line), so
the reference cannot drift from the code; a field without one gets its section's docstring line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing

from jp_peft.spec import fields as spec_fields


def _comments_by_line(source: str) -> dict[int, str]:
    return {tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}


def _field_help(cls) -> dict[str, str]:
    """field name -> the comment lines directly above its declaration, or the one on its line."""
    source = inspect.getsource(spec_fields)
    comments = _comments_by_line(source)
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    out = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            lines, line = [], item.lineno - 1
            while line in comments and line > node.lineno:
                lines.insert(0, comments[line])
                line -= 1
            if item.lineno in comments:
                lines.append(comments[item.lineno])
            out[item.target.id] = " ".join(lines)
    return out


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("jp_peft.spec.fields.", "")


def field_rows(cls=spec_fields.ExperimentSpec, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted field, type, default, help) of every leaf field, sections expanded in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    helps = _field_help(cls)
    section_doc = (inspect.getdoc(cls) or "").split("\n")[0]
    nested = spec_fields._NESTED.get(cls, {})
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if f.name in nested:
            rows += field_rows(nested[f.name], path + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "[" + ", ".join(map(str, default)) + "]" if isinstance(default, tuple) else repr(default)
        if isinstance(default, tuple) and default and dataclasses.is_dataclass(default[0]):
            shown = f"[{len(default)} entries]"
        rows.append((path, _type_name(hints[f.name]), shown, helps.get(f.name) or section_doc))
    return rows


def format_fields() -> str:
    rows = field_rows()
    width = max(len(r[0]) for r in rows)
    lines = ["Spec fields (YAML presets, or KEY=VALUE on the command line; train.X / data.X set cpt and sft):"]
    for path, kind, default, text in rows:
        lines.append(f"  {path:<{width}}  {kind}  (default {default})")
        if text:
            lines.append(f"  {'':<{width}}    {text}")
    return "\n".join(lines)
