"""The package's layers, read from its source with ``ast``: no import cycle inside ``difftune/`` (lazy
imports in functions included), the tuners below the trainers and the model families, and no
comparison with a method's or a family's name outside its own module (what a method or a family
can do is an attribute of its class)."""

import ast
from pathlib import Path

import pytest

from difftune.families import FAMILIES
from difftune.tuners import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "difftune"
SCRIPT_FOLDERS = ("train_scripts", "eval")
LITERALS = (ast.Tuple, ast.List, ast.Set)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module ``path`` imports, at the top or inside a function: the module named, the
    module a ``from`` import takes a submodule from, and the packages Python runs on the way (their
    ``__init__``), less those that contain ``path`` (they are running already)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets.add(source)
            targets.update(f"{source}.{alias.name}" for alias in node.names)
    found = set()
    for target in targets:
        parts = target.split(".")
        for end in range(1, len(parts) + 1):
            each = ".".join(parts[:end])
            if each in modules and not name.startswith(each + ".") and each != name:
                found.add(each)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for other in graph[todo.pop()]:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "difftune.model_factory" in graph["difftune.params"]  # imported inside a function
    assert "difftune.families.base" in graph["difftune.families.sd3"]  # from .base import ...
    assert "difftune.training.pivotal" in graph["difftune.training.arguments"]  # from . import pivotal
    assert "difftune.families" in graph["difftune.export.formats"]  # from ..families import ...
    # a cycle among other modules is found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_inside_the_package():
    assert cycles(import_graph()) == []


def test_the_tuners_import_neither_the_trainers_nor_the_model_families():
    graph = import_graph()
    for name in graph:
        if name.startswith("difftune.tuners"):
            above = sorted(m for m in reachable(graph, name)
                           if m.startswith(("difftune.training", "difftune.families")))
            assert not above, f"{name} imports {above}"


# --- names compared outside their own module ------------------------------------------------

def own_modules() -> dict[str, str]:
    """Each registered method's and family's name, with the source folder or file that may use it."""
    owners = {}
    for name, method in METHODS.items():
        owners[name] = Path(method.__module__.replace(".", "/")).parent.as_posix()
    for name, family in FAMILIES.items():
        owners[name] = family.__module__.replace(".", "/") + ".py"
        for pipeline in family.pipeline_classes:
            owners[pipeline] = owners[name]
    return owners


def name_comparisons(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """``x == "sara"``, ``family in ("sd", "sdxl")``, ``type(p).__name__ != "FluxPipeline"``, ...: a name
    on either side of an (in)equality, or in a literal collection something is looked up in. (A name on
    the left of ``in`` is a substring or membership test of something else, e.g. ``"lora" in key``.)"""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        for operator, left, right in zip(node.ops, sides[:-1], sides[1:], strict=True):
            if isinstance(operator, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot)):
                values = [left, right]
            elif isinstance(operator, (ast.In, ast.NotIn)) and isinstance(right, LITERALS):
                values = right.elts
            else:
                continue
            found += [(node.lineno, v.value) for v in values
                      if isinstance(v, ast.Constant) and v.value in names]
    return found


def checked_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    for folder in SCRIPT_FOLDERS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_the_name_check_finds_a_comparison(tmp_path):
    source = tmp_path / "x.py"
    source.write_text('if method == "sara" or family in ("sd", "flux") or "sd" in key:\n'
                      '    pass\nname = "sara"\n')
    assert name_comparisons(source, {"sara", "sd", "flux"}) == [(1, "sara"), (1, "sd"), (1, "flux")]


def test_no_method_or_family_name_is_compared_outside_its_own_module():
    owners = own_modules()
    offences = []
    for path in checked_files():
        relative = path.relative_to(ROOT).as_posix()
        for line, name in name_comparisons(path, set(owners)):
            if not relative.startswith(owners[name]):
                offences.append(f"{relative}:{line} compares with '{name}'")
    assert not offences, "ask the method's or family's class instead:\n" + "\n".join(offences)


@pytest.mark.parametrize("name", ["FluxPipeline", "StableDiffusionXLPipeline"])
def test_pipeline_class_names_appear_only_in_their_family(name):
    owner = own_modules()[name]
    users = [path.relative_to(ROOT).as_posix() for path in checked_files()
             if f'"{name}"' in path.read_text() and not path.relative_to(ROOT).as_posix().startswith(owner)]
    assert users == [], f"{name} is named outside {owner}: {users}"

