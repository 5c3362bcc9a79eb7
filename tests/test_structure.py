"""The layout rules the contributor guide promises: the library never reaches up into its CLI or its test
helpers, functions stay short enough to read, and the objective table is the single place forms come from."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from megatron_sft.objectives import (OBJECTIVE_FORMS, VALID_FORMS, ObjectiveSpecError, adaptive_specs, canonical_spec,
                                     example_specs, parse_objective)

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_sft"
MAX_FUNCTION_LINES = 70


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imported_names(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _violations(package: str, allowed) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)} imports {name}"
            for path in _modules() if not allowed(path.relative_to(PACKAGE))
            for name in sorted(_imported_names(path)) if name == package or name.startswith(package + ".")]


def test_library_never_imports_the_cli():
    allowed = lambda rel: rel.parts[0] == "commands" or rel.as_posix() == "cli.py"  # noqa: E731
    assert _violations("megatron_sft.commands", allowed) == []


def test_library_never_imports_the_test_helpers():
    assert _violations("megatron_sft.testing", lambda rel: rel.parts[0] == "testing") == []


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from megatron_sft.commands.train import run\n    import megatron_sft.testing.x\n")
    assert {"megatron_sft.commands.train", "megatron_sft.testing.x"} <= _imported_names(module)


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], f"split these (limit {MAX_FUNCTION_LINES} lines): {long}"


# ---- the objective table ----

@pytest.mark.parametrize("form", OBJECTIVE_FORMS, ids=lambda f: f.name)
def test_every_form_is_listed_parsed_and_exemplified(form):
    assert form.usage in VALID_FORMS
    assert form.examples, f"{form.name} has no example spec (the CLI table and the loss tests run the examples)"
    for spec in form.examples:
        objective = parse_objective(spec)
        assert objective.spec == spec and canonical_spec(spec).split(":")[0] == form.name
        assert (spec in adaptive_specs()) == form.adaptive and (spec in example_specs()) != form.adaptive
    for alias in form.aliases:
        assert canonical_spec(alias).split(":")[0] == form.name
    if form.reference_key:
        args = "-".join("0.5" for _ in form.arguments)
        assert parse_objective(f"{form.reference_key}-{args}").name == parse_objective(f"{form.name}:{args.replace('-', ':')}").name


@pytest.mark.parametrize("form", [f for f in OBJECTIVE_FORMS if f.arguments], ids=lambda f: f.name)
def test_every_argument_rule_is_enforced(form):
    """A value outside each argument's rule is refused with the argument's rule in the message."""
    outside = {"> 0 (alpha -> 0 is nll)": -1.0, ">= 0": -0.5, "in [0, 1]": 1.5, "in (0, 100]": 0.0}
    for index, argument in enumerate(form.arguments):
        values = [a.default if a.default is not None else 0.5 for a in form.arguments]
        values[index] = outside[argument.rule]
        with pytest.raises(ObjectiveSpecError, match=re.escape(f"must be {argument.rule}")):
            parse_objective(f"{form.name}:{':'.join(f'{v:g}' for v in values)}")


def test_readme_objective_table_covers_every_form():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Objectives"):]
    section = section[: section.index("\n## ", 1)]
    for form in OBJECTIVE_FORMS:
        grouped = re.sub(r"^(nll|neg_p|log1mp)_", "<base>_", form.usage)
        assert f"`{form.usage}`" in section or f"`{grouped}`" in section, f"README's objective table lacks {form.usage}"


def test_contributing_examples_are_the_real_code():
    """The objective example in CONTRIBUTING.md is copied from objectives.py: it cannot go stale."""
    guide = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    source = (PACKAGE / "objectives.py").read_text()
    blocks = re.findall(r"<!-- objective-example: \w+ -->\n```python\n(.*?)```", guide, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        assert block in source, f"CONTRIBUTING.md shows code that objectives.py does not have:\n{block}"
