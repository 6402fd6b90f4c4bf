"""The house as docs/ARCHITECTURE.md draws it: every module of src/rho1 in one layer of its table, each import to
the same layer or below, no stage importing another, no import circle. The page and the code cannot drift."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def modules() -> dict[str, set[str]]:
    """Every module of rho1 (its path under src/rho1) and the rho1 modules it imports, at any depth of its code."""
    paths = {p.relative_to(SRC / "rho1").as_posix(): p for p in sorted((SRC / "rho1").rglob("*.py"))}
    found = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for imported in (n for n in names if n == "rho1" or n.startswith("rho1.")):
                parts = imported.split(".")[1:]
                for candidate in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
                    if candidate in paths:
                        deps.add(candidate)
                if isinstance(node, ast.ImportFrom):  # from rho1.data import store: the module store.py
                    for alias in node.names:
                        sub = "/".join([*parts, alias.name]) + ".py"
                        if sub in paths:
                            deps.add(sub)
        found[name] = deps - {name}
    return found


def layers() -> dict[str, int]:
    """The table of docs/ARCHITECTURE.md: each module (a file, or every file of a folder) with its layer."""
    table = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        row = re.match(r"\|\s*(\d)\s*\|[^|]*\|(.*)\|\s*$", line)
        if row:
            for entry in re.findall(r"`([^`]+)`", row.group(2)):
                table[entry] = int(row.group(1))
    return table


def layer_of(module: str, table: dict[str, int]) -> tuple[int, str]:
    """(layer, the table entry that places it): the file itself, else its folder."""
    if module in table:
        return table[module], module
    folder = module.split("/")[0] + "/"
    assert folder in table, f"src/rho1/{module} is in no layer of docs/ARCHITECTURE.md"
    return table[folder], folder


def test_every_module_has_a_layer_and_imports_only_its_own_layer_or_below():
    table, found = layers(), modules()
    assert len(found) > 50 and max(table.values()) == 9
    up = []
    for module, deps in found.items():
        mine = layer_of(module, table)[0]
        up += [f"{module} (layer {mine}) imports {d} (layer {layer_of(d, table)[0]})" for d in deps
               if layer_of(d, table)[0] > mine]
    assert not up, up


def test_no_stage_imports_another_and_nothing_imports_in_a_circle():
    table, found = layers(), modules()
    stage = {m: layer_of(m, table)[1] for m in found if layer_of(m, table)[0] == 6}
    crossing = [f"{m} imports {d}" for m, deps in found.items() if m in stage
                for d in deps if d in stage and stage[d] != stage[m]]
    assert not crossing, crossing
    state = {}  # depth-first search: 1 on the path, 2 done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(found[module]):
            assert state.get(dep) != 1, "import circle: " + " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in found:
        if module not in state:
            visit(module, [])


def test_no_module_over_450_lines_and_no_function_over_60():
    long = []
    for path in (SRC / "rho1").rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 450:
            long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name}(): {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
