"""Render the config reference (docs/config.md) from the JSON Schema, so it cannot drift.

python -m shardtune.config_docs > docs/config.md
"""

import json

from shardtune.config import load_schema

HEADER = """# Config reference

Generated from `workflow/schemas/config.schema.yaml` by `python -m shardtune.config_docs`
(a test fails when this file is out of date). Top-level sections are the defaults of every
run; `runs:` maps run names to overrides of any of them.
"""


def _type(spec):
    if "enum" in spec:
        return " \\| ".join(f"`{v}`" for v in spec["enum"])
    if "const" in spec:
        return f"`{spec['const']}`"
    if "oneOf" in spec:
        return " or ".join(_type(s) for s in spec["oneOf"])
    kind = spec.get("type", "object")
    return " \\| ".join(kind) if isinstance(kind, list) else kind


def _rows(prefix, spec, defs):
    if "$ref" in spec:
        spec = {**defs[spec["$ref"].split("/")[-1]], **{k: v for k, v in spec.items() if k != "$ref"}}
    for name, sub in spec.get("properties", {}).items():
        key = f"{prefix}{name}"
        if "$ref" in sub:
            sub = {**defs[sub["$ref"].split("/")[-1]], **{k: v for k, v in sub.items() if k != "$ref"}}
        if sub.get("type") == "object" and "properties" in sub:
            yield from _rows(f"{key}.", sub, defs)
            continue
        default = json.dumps(sub.get("default")) if "default" in sub else ""
        description = " ".join(str(sub.get("description", "")).split()).replace("|", "\\|")
        yield f"| `{key}` | {_type(sub)} | `{default}` | {description} |"


def render(schema=None):
    schema = schema or load_schema()
    defs = schema.get("$defs", {})
    parts = [HEADER]
    for section, spec in schema["properties"].items():
        if section == "runs":
            parts.append("## `runs`\n\n" + " ".join(spec["description"].split()) + f". Default: `{json.dumps(spec['default'])}`.\n")
            continue
        resolved = defs[spec["$ref"].split("/")[-1]] if "$ref" in spec else spec
        parts.append(f"## `{section}`\n")
        if resolved.get("description"):
            parts.append(" ".join(resolved["description"].split()) + "\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        parts.append("\n".join(_rows(f"{section}.", resolved, defs)) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
