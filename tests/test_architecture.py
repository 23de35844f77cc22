"""The layout rules of docs/ARCHITECTURE.md, read from the source with `ast`: layers import only downward, no import
circle, commands are not imported as libraries, project imports sit at the top of files, modules and functions stay
short."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = ("stellar_tok", "generators", "benchmarks")

# The layers, lowest first. A module may import from its own package (siblings) and from lower layers only.
LAYERS = [
    ("ground", ["stellar_tok.config", "stellar_tok.tokenizer_config", "stellar_tok.errors", "stellar_tok.files",
                "stellar_tok.launch", "stellar_tok.moved_modules"]),
    ("model", ["stellar_tok.model"]),
    ("data", ["stellar_tok.data"]),
    ("losses", ["stellar_tok.losses"]),
    ("latents", ["stellar_tok.latents"]),
    ("evaluation", ["stellar_tok.evaluation"]),
    ("training", ["stellar_tok.training"]),
    ("commands", ["stellar_tok"]),  # the commands users run: python -m stellar_tok.train, ...
    ("generator library", ["generators"]),
    ("generator commands", ["generators.train", "generators.sample", "generators.evaluate", "generators.class_accuracy"]),
    ("benchmarks", ["benchmarks"]),
]
# Independent layers of the same level: neither may import the other.
SAME_LEVEL = {"model": 1, "data": 1, "losses": 1}
COMMANDS = {"stellar_tok.train", "stellar_tok.tokenize", "stellar_tok.evaluate", "stellar_tok.probe",
            "stellar_tok.visualize", "stellar_tok.fid_stats", "stellar_tok.make_shards", "stellar_tok.make_emoji",
            "stellar_tok.demo_report", "stellar_tok.convert_reference", "generators.train", "generators.sample", "generators.evaluate",
            "generators.class_accuracy"}
FACADES = {"stellar_tok", "generators"}  # package __init__ files that re-export the public API
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _source_files():
    for top in PROJECT:
        yield from sorted((ROOT / top).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


MODULES = {_module_name(p): p for p in _source_files()}


def _layer(module: str) -> tuple[int, str]:
    """(level, name) of the most specific layer prefix of `module`."""
    best = None
    for i, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[2]:
                    best = (SAME_LEVEL.get(name, i), name, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py"
    return best[0], best[1]


def _imports(module: str, path: pathlib.Path):
    """(imported project module, line, function-local?) for every project import of `module`."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            while name not in MODULES and "." in name:
                name = name.rpartition(".")[0]
            if name in MODULES and name.split(".")[0] in PROJECT:
                yield name, node.lineno, node.lineno in local_lines


GRAPH = {m: sorted({t for t, _, _ in _imports(m, p) if t != m}) for m, p in MODULES.items()}


def upward_imports(graph: dict) -> list[str]:
    """'importer (layer) imports target (layer)' for every import that does not go down the layers."""
    wrong = []
    for module, targets in graph.items():
        if module in FACADES:
            continue
        level, layer = _layer(module)
        for target in targets:  # a module of the same layer (its own package) is fine
            t_level, t_layer = _layer(target)
            if t_level >= level and t_layer != layer:
                wrong.append(f"{module} ({layer}) imports {target} ({t_layer})")
    return wrong


def find_cycle(graph: dict) -> list[str] | None:
    """One import circle of `graph` (module -> imported modules) as [a, b, ..., a], or None."""
    state: dict = {}  # module -> "open" while on the DFS stack, "done" after

    def visit(module, stack):
        state[module] = "open"
        for target in graph.get(module, []):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [module, target] if target in stack else [module, target]
            if target not in state:
                cycle = visit(target, stack + [module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        cycle = None if module in state else visit(module, [])
        if cycle:
            return cycle
    return None


def test_the_checks_catch_what_they_look_for():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None
    assert upward_imports({"stellar_tok.model.tokenizer": ["stellar_tok.training.engine"]}) == [
        "stellar_tok.model.tokenizer (model) imports stellar_tok.training.engine (training)"]
    assert upward_imports({"stellar_tok.model.vit": ["stellar_tok.data.views"]})  # same level, other package
    assert upward_imports({"stellar_tok.config": ["stellar_tok.data"]})  # the ground imports a loader
    assert not upward_imports({"stellar_tok.training.engine": ["stellar_tok.model.tokenizer", "stellar_tok.training.budget"]})


def test_layers_import_only_downward():
    wrong = upward_imports(GRAPH)
    assert not wrong, "imports that do not go down the layers:\n" + "\n".join(wrong)


def test_no_import_circle():
    cycle = find_cycle(GRAPH)
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_names_that_cross_modules_are_public():
    private = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PROJECT):
                private += [f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}" for a in node.names
                            if a.name.startswith("_")]
    assert not private, "private names imported from another module:\n" + "\n".join(private)


def test_no_command_is_imported_as_a_library():
    wrong = [f"{m} imports the command {t}" for m, ts in GRAPH.items() for t in ts if t in COMMANDS]
    assert not wrong, "\n".join(wrong)


def test_project_imports_are_at_the_top_of_files():
    local = sorted({f"{p.relative_to(ROOT)}:{line} imports {t} inside a function"
                    for m, p in MODULES.items() for t, line, inside in _imports(m, p) if inside})
    assert not local, "\n".join(local)


def test_function_local_imports_say_why():
    """A function-local import (a heavy optional dependency) carries a comment on its line saying which."""
    silent = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(f):
                    if isinstance(n, (ast.Import, ast.ImportFrom)) and "#" not in lines[n.end_lineno - 1]:
                        silent.append(f"{path.relative_to(ROOT)}:{n.lineno}")
    assert not silent, "function-local imports without a comment saying why:\n" + "\n".join(silent)


@pytest.mark.parametrize("top", PROJECT)
def test_modules_and_functions_are_short(top):
    long_modules, long_functions = [], []
    for path in sorted((ROOT / top).rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for f in ast.walk(ast.parse(text)):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES:
                long_functions.append(f"{path.relative_to(ROOT)}:{f.lineno} {f.name}: {f.end_lineno - f.lineno + 1} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)
