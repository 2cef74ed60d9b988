"""The code layout: no import cycle anywhere in the package (``cli``, ``commands`` and the library
included, imports inside functions counted too), and a command layer that stays thin."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "synthnet"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: {synthnet modules it imports}}``, from the source, every import statement included."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "synthnet.commands" in graph["synthnet.cli"]  # the graph sees imports inside functions
    assert "synthnet.config" in graph["synthnet.commands.zoo"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    assert not any(m.startswith("synthnet.commands") or m == "synthnet.cli"
                   for name, deps in graph.items() if not name.startswith(("synthnet.commands", "synthnet.cli",
                                                                          "synthnet.__main__"))
                   for m in deps)  # the library never reaches up into the command layer


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_code_defaults_equal_the_packaged_config():
    """Settings dataclasses and generator constructors keep defaults for library use; they must be the
    values the packaged YAML gives a user, or the two would describe different runs."""
    import dataclasses
    import inspect

    import yaml

    from synthnet.generators.flat_mlp import FlatMLPGenerator
    from synthnet.generators.perceiver_moe import PerceiverMoEGenerator
    from synthnet.methods.grpo import GRPOSettings
    from synthnet.methods.imitation import ImitationSettings
    from synthnet.methods.task import TaskSettings
    from synthnet.zoo.training import Recipe

    configs = PACKAGE / "configs"
    load = lambda name: yaml.safe_load((configs / name).read_text())  # noqa: E731
    differences = []
    pairs = [(ImitationSettings, load("method/imitation.yaml")), (TaskSettings, load("method/task.yaml")),
             (GRPOSettings, load("method/grpo.yaml")), (Recipe, load("config.yaml")["zoo"])]
    for cls, values in pairs:
        for f in dataclasses.fields(cls):
            if f.name in values and values[f.name] is not None and f.default is not dataclasses.MISSING:
                default = list(f.default) if isinstance(f.default, tuple) else f.default
                if default != values[f.name]:
                    differences.append(f"{cls.__name__}.{f.name}: code {default!r}, yaml {values[f.name]!r}")
    for cls, name in ((PerceiverMoEGenerator, "generator/perceiver_moe.yaml"), (FlatMLPGenerator, "generator/flat_mlp.yaml")):
        values = load(name)
        for key, parameter in inspect.signature(cls.__init__).parameters.items():
            if key in values and parameter.default is not inspect.Parameter.empty and parameter.default != values[key]:
                differences.append(f"{cls.__name__}.{key}: code {parameter.default!r}, yaml {values[key]!r}")
    assert not differences, differences
