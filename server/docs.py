"""README tables generated from the schemas, so the docs cannot drift.

python -m server.docs            rewrite the generated blocks of README.md
python -m server.docs --check    exit non-zero when README.md is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic import BaseModel

from pipeline.registry import TASKS
from server import fal, wavespeed
from server.config import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- begin:(?P<name>[\w:-]+) -->\n).*?(<!-- end:(?P=name) -->)", re.S)


def _constraints(schema: dict) -> str:
    for option in schema.get("anyOf", []):  # an optional parameter: the bounds are on its non-null type
        if option.get("type") != "null":
            schema = {**option, **schema}
    ops = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
    bounds = [f"{op} {schema[key]}" for key, op in ops if key in schema]
    if "enum" in schema:
        bounds.append(" / ".join(f"`{v}`" for v in schema["enum"]))
    return ", ".join(bounds)


def _type(schema: dict) -> str:
    options = schema.get("anyOf", [schema])
    names = [o.get("type", "") for o in options if o.get("type") != "null"]
    return " or ".join(n for n in names if n) or "string"


def parameters_table(model: str) -> str:
    """Markdown table of a model's request parameters (besides `image`)."""
    return schema_table(TASKS[model].params)


def schema_table(params: type[BaseModel]) -> str:
    """Markdown table of a request schema's fields."""
    schema = params.model_json_schema()
    rows = ["| Parameter | Type | Default | Allowed | Description |", "| --- | --- | --- | --- | --- |"]
    for name, prop in schema["properties"].items():
        default = prop.get("default")
        shown = "" if default is None else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        rows.append(f"| `{name}` | {_type(prop)} | {shown} | {_constraints(prop)} | {prop.get('description', '')} |")
    return "\n".join(rows)


def blocks() -> dict[str, str]:
    generated = {f"parameters:{name}": parameters_table(name) for name in TASKS}
    generated.update({f"wavespeed:{m.task}": schema_table(m.schema) for m in wavespeed.MODELS.values()})
    generated.update({f"fal:{app}": schema_table(schema) for app, (_, schema, _) in fal.APPS.items()})
    generated["configuration"] = markdown_table()
    return generated


def render(text: str) -> str:
    generated = blocks()
    return BLOCK.sub(lambda m: m.group(1) + generated[m.group("name")] + "\n" + m.group(3), text)


def main() -> int:
    parser = argparse.ArgumentParser(description="Regenerate the README's tables.")
    parser.add_argument("--check", action="store_true", help="only report whether README.md is up to date")
    args = parser.parse_args()
    current = README.read_text()
    absent = [name for name in blocks() if f"<!-- begin:{name} -->" not in current]
    if absent:
        print(f"README.md lacks the generated block(s) {', '.join(absent)}: add their markers", file=sys.stderr)
        return 1
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md is out of date: run python -m server.docs", file=sys.stderr)
        return int(fresh != current)
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
