"""The packages' import graph, read from the source (every import statement, function-level ones included):
dependencies run one way. jaxgpt.spec is the standard-library-only specification both twins import; torch_ref
never imports JAX or jaxgpt beyond the spec (an exported folder carries torch_ref without jaxgpt), and jaxgpt's
JAX side never imports PyTorch."""

import ast
import sys
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxgpt", "torch_ref")
JAX_LIBRARIES = {"jax", "jaxlib", "flax", "optax", "orbax"}
TORCH_LIBRARIES = {"torch", "transformers", "torch_ref"}
TORCH_BRIDGES = {"jaxgpt.export", "jaxgpt.evaluate"}  # jaxgpt modules that may use torch_ref / transformers
TORCH_FREE = ("jaxgpt.model", "jaxgpt.layers", "jaxgpt.ops", "jaxgpt.train")  # not even in a function


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. jaxgpt.layers.block
    module: str  # the absolute name imported: a module, or the package of `from package import name`
    line: int
    top_level: bool  # executed when the importer is imported (not inside a function)
    relative: bool

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}) imports {self.module}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {
    module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
}


def imports_of(name: str) -> list[Import]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        top_level = id(node) not in in_function
        if isinstance(node, ast.Import):
            out += [Import(name, a.name, node.lineno, top_level, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from package import submodule` imports the submodule; `from module import name` the module
            targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            if len(targets) < len(node.names):
                targets.append(base)
            out += [Import(name, t, node.lineno, top_level, bool(node.level)) for t in targets]
    return out


IMPORTS: dict[str, list[Import]] = {name: imports_of(name) for name in MODULES}


def top(module: str) -> str:
    return module.split(".")[0]


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read():
    """The reader sees relative, `from package import submodule` and function-level imports."""
    assert "jaxgpt.spec.config" in {i.module for i in IMPORTS["jaxgpt.spec.variants"] if i.relative}
    assert "torch_ref.model" in {i.module for i in IMPORTS["torch_ref"]}
    assert [i for i in IMPORTS["jaxgpt.export"] if i.module == "torch_ref.hf" and not i.top_level]


def cycles(imports: dict[str, list[Import]]) -> list[str]:
    """Every import cycle among the modules of `imports` found by a depth-first search, as `a -> b -> a`."""
    edges = {name: sorted({i.module for i in found if i.module in imports and i.module != name})
             for name, found in imports.items()}
    state: dict[str, str] = {}  # "open" while on the search's path, "done" after
    out = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in edges[name]:
            if state.get(dep) == "open":
                out.append(" -> ".join(path[path.index(dep):] + [name, dep]) if dep in path else f"{name} -> {dep}")
            elif dep not in state:
                visit(dep, path + [name])
        state[name] = "done"

    for name in edges:
        if name not in state:
            visit(name, [])
    return out


def spec_violations(imports: dict[str, list[Import]]) -> list[str]:
    """jaxgpt.spec imports the standard library and itself (relatively: an export folder holds it flat)."""
    return [f"{i}: not the standard library" if not in_package(i.module, "jaxgpt.spec") else f"{i}: not relative"
            for name, found in imports.items() if in_package(name, "jaxgpt.spec") for i in found
            if (not in_package(i.module, "jaxgpt.spec") and top(i.module) not in sys.stdlib_module_names)
            or (in_package(i.module, "jaxgpt.spec") and not i.relative)]


def torch_ref_violations(imports: dict[str, list[Import]]) -> list[str]:
    """torch_ref imports no JAX library, nothing of jaxgpt but jaxgpt.spec, and itself relatively only."""
    out = []
    for name, found in imports.items():
        if top(name) != "torch_ref":
            continue
        for i in found:
            if top(i.module) in JAX_LIBRARIES:
                out.append(f"{i}: a JAX library")
            elif top(i.module) == "jaxgpt" and not in_package(i.module, "jaxgpt.spec"):
                out.append(f"{i}: jaxgpt beyond jaxgpt.spec")
            elif top(i.module) == "torch_ref" and not i.relative:
                out.append(f"{i}: torch_ref's own modules are imported relatively (`from .x import`)")
    return out


def jaxgpt_torch_violations(imports: dict[str, list[Import]]) -> list[str]:
    """jaxgpt imports torch, transformers or torch_ref at module level only in the bridges, and its JAX model,
    layers, ops and training never (not in a function either)."""
    return [f"{i}: " + ("not even in a function" if torch_free else "at module level")
            for name, found in imports.items() if top(name) == "jaxgpt"
            for torch_free in [any(in_package(name, p) for p in TORCH_FREE)] for i in found
            if top(i.module) in TORCH_LIBRARIES and (torch_free or (i.top_level and name not in TORCH_BRIDGES))]


def test_no_import_cycles():
    found = cycles(IMPORTS)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_spec_imports_only_the_standard_library_and_itself():
    found = spec_violations(IMPORTS)
    assert not found, "jaxgpt.spec:\n" + "\n".join(found)


def test_torch_ref_imports_no_jax_and_only_the_spec_of_jaxgpt():
    found = torch_ref_violations(IMPORTS)
    assert not found, "torch_ref:\n" + "\n".join(found)


def test_jaxgpt_imports_torch_only_in_the_bridges():
    found = jaxgpt_torch_violations(IMPORTS)
    assert not found, "jaxgpt and PyTorch:\n" + "\n".join(found)


def test_the_rules_name_the_offending_import():
    """Each rule on a made-up graph that breaks it."""
    graph = {
        "jaxgpt.spec.config": [Import("jaxgpt.spec.config", "numpy", 3, True, False),
                               Import("jaxgpt.spec.config", "jaxgpt.spec.errors", 4, True, False),
                               Import("jaxgpt.spec.config", "dataclasses", 5, True, False)],
        "jaxgpt.spec.errors": [],
        "torch_ref.model": [Import("torch_ref.model", "jaxgpt.losses", 7, True, False),
                            Import("torch_ref.model", "flax.nnx", 8, False, False),
                            Import("torch_ref.model", "torch_ref.block", 9, True, False),
                            Import("torch_ref.model", "jaxgpt.spec.config", 10, True, False)],
        "torch_ref.block": [Import("torch_ref.block", "torch_ref.model", 5, False, True)],
        "jaxgpt.layers.block": [Import("jaxgpt.layers.block", "torch", 30, False, False)],
        "jaxgpt.checkpoint": [Import("jaxgpt.checkpoint", "transformers", 2, True, False)],
        "jaxgpt.export": [Import("jaxgpt.export", "torch_ref.hf", 12, True, False)],
    }
    assert cycles(graph) == ["torch_ref.model -> torch_ref.block -> torch_ref.model"]
    assert spec_violations(graph) == [
        "jaxgpt.spec.config (line 3) imports numpy: not the standard library",
        "jaxgpt.spec.config (line 4) imports jaxgpt.spec.errors: not relative",
    ]
    assert torch_ref_violations(graph) == [
        "torch_ref.model (line 7) imports jaxgpt.losses: jaxgpt beyond jaxgpt.spec",
        "torch_ref.model (line 8) imports flax.nnx: a JAX library",
        "torch_ref.model (line 9) imports torch_ref.block: torch_ref's own modules are imported relatively "
        "(`from .x import`)",
    ]
    assert jaxgpt_torch_violations(graph) == [
        "jaxgpt.layers.block (line 30) imports torch: not even in a function",
        "jaxgpt.checkpoint (line 2) imports transformers: at module level",
    ]
