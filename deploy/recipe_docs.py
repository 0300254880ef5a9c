"""Write docs/recipes.md, the recipe settings reference, from `Recipe.model_json_schema()`.

Run `python -m deploy.recipe_docs` after changing a field in deploy/recipe.py; tests/test_recipe_docs.py fails
while the file is stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .recipe import Recipe

DOC = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"
HEADER = "<!-- Generated from deploy/recipe.py by `python -m deploy.recipe_docs`; do not edit by hand. -->"
SCALARS = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None"}
BOUNDS = {"exclusiveMinimum": ">", "minimum": ">=", "exclusiveMaximum": "<", "maximum": "<="}


def _ref(prop: dict[str, Any]) -> str | None:
    """The $defs name of a nested model, else None."""
    return prop["$ref"].rsplit("/", 1)[-1] if "$ref" in prop else None


def type_name(prop: dict[str, Any]) -> str:
    """A JSON-schema property as a Python-like type: `float | None`, `"ort-cpu" | "tensorrt"`, `dict[str, X]`."""
    if ref := _ref(prop):
        return ref
    if "anyOf" in prop:
        return " | ".join(type_name(p) for p in prop["anyOf"])
    if "enum" in prop or "const" in prop:
        return " | ".join(json.dumps(v) for v in prop.get("enum", [prop.get("const")]))
    if prop.get("type") == "array":
        if "prefixItems" in prop:
            return f"tuple[{', '.join(type_name(p) for p in prop['prefixItems'])}]"
        return f"list[{type_name(prop['items'])}]"
    if prop.get("type") == "object":
        values = prop.get("additionalProperties")
        return f"dict[str, {type_name(values) if isinstance(values, dict) else 'Any'}]"
    return SCALARS[prop["type"]]


def constraints(prop: dict[str, Any]) -> str:
    """Numeric bounds, also those inside an `X | None` union."""
    parts = [prop, *prop.get("anyOf", [])]
    return ", ".join(f"{op} {p[key]}" for p in parts for key, op in BOUNDS.items() if key in p)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _sections(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(dotted path, model name, model schema) of Recipe and every model under it, depth first."""
    found = []

    def walk(path: str, name: str, model: dict[str, Any]) -> None:
        if any(name == seen for _, seen, _ in found):  # a model used in two places (DeviceConfig) gets one section
            return
        found.append((path, name, model))
        for field, prop in model["properties"].items():
            child = f"{path}.{field}" if path else field
            optional = next((_ref(p) for p in prop.get("anyOf", []) if _ref(p)), None)  # X | None
            if ref := _ref(prop) or optional:
                walk(child, ref, schema["$defs"][ref])
            elif isinstance(values := prop.get("additionalProperties"), dict) and (ref := _ref(values)):
                walk(f"{child}.<name>", ref, schema["$defs"][ref])
            elif isinstance(items := prop.get("items"), dict) and (ref := _ref(items)):
                walk(f"{child}[]", ref, schema["$defs"][ref])

    walk("", schema["title"], schema)
    return found


def render() -> str:
    schema = Recipe.model_json_schema()
    lines = [HEADER, "", "# Recipe settings", "",
             "Every setting of a recipe YAML (recipes/*.yaml), by section; a section is a nested mapping of the YAML.",
             "None in a description is YAML `null`. `deploy build` options override some settings (`--target` sets",
             "`quantize.target`).", ""]  # fmt: skip
    for path, name, model in _sections(schema):
        lines += [f"## {f'`{path}`' if path else 'Top level'} ({name})", ""]
        if "description" in model:
            lines += [model["description"], ""]
        lines += ["| field | type | default | constraints | description |", "|---|---|---|---|---|"]
        for field, prop in model["properties"].items():
            if field in model.get("required", []):
                default = "required"
            else:  # a nested model's defaults are in its own section
                default = "" if _ref(prop) else f"`{json.dumps(prop['default'])}`"
            cells = [f"`{field}`", f"`{type_name(prop)}`", default, constraints(prop), prop.get("description", "")]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
