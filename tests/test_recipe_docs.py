"""docs/recipes.md is generated from the recipe schema, which describes every field."""

from pathlib import Path

import pytest

from deploy import recipe, recipe_docs

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = recipe.Recipe.model_json_schema()
MODELS = {"Recipe": SCHEMA, **SCHEMA["$defs"]}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_field_has_a_description(model):
    props = MODELS[model]["properties"]
    missing = [name for name, prop in props.items() if not prop.get("description", "").strip()]
    assert not missing, f"{model}: add Field(description=...) to {missing}"


def test_every_model_gets_a_section():
    assert sorted(name for _, name, _ in recipe_docs._sections(SCHEMA)) == sorted(MODELS)


def test_docs_are_up_to_date():
    assert recipe_docs.DOC == ROOT / "docs" / "recipes.md"
    assert recipe_docs.DOC.read_text() == recipe_docs.render(), "run `python -m deploy.recipe_docs`"


def test_types_are_readable():
    props = SCHEMA["$defs"]["QuantizeConfig"]["properties"]
    assert recipe_docs.type_name(props["target"]) == '"ort-cpu" | "tensorrt" | "openvino"'
    assert recipe_docs.type_name(SCHEMA["$defs"]["QATConfig"]["properties"]["lr"]) == "float | None"
    assert recipe_docs.constraints(SCHEMA["$defs"]["QATConfig"]["properties"]["lr"]) == "> 0"
    assert recipe_docs.type_name(SCHEMA["$defs"]["VerifyConfig"]["properties"]["metrics"]) == "dict[str, MetricGate]"


@pytest.mark.parametrize(
    "path", sorted([*ROOT.glob("recipes/*.yaml"), *ROOT.glob("recipes/cifar10/*.yaml")]), ids=lambda p: str(p.relative_to(ROOT))
)
def test_builtin_recipe_files_validate(path):
    assert recipe.load(str(path)).model.name
