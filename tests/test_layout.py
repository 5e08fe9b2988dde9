"""The architecture as the folders show it (docs/DESIGN.md): layers import only downwards, no import circle,
and the core install needs only torch, torch-pruning and numpy."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "polarprune_cuda"

#: each unit of the package and its floor; a module may import its own unit or any unit on a lower floor
FLOORS = {
    "errors": 0, "_version": 0, "defaults": 0, "models": 0, "_io": 1, "kernels": 1.5, "ops": 2, "gates": 3, "surgery": 4, "sparse": 4,
    "export": 4, "train": 5, "cli": 6, "__main__": 7, "__init__": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        if path.parts[-2] == "kernels" and path.is_relative_to(ROOT / "kernels"):
            parts = ["polarprune_cuda", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts]
        else:
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for stmt in block.body for n in ast.walk(stmt)}   # annotations only: no arrow at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            modules = {f"{target}.{a.name}" for a in node.names} & known
            found |= modules or ({target} & known)   # "from . import x" imports x, not the package
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    found.discard(module)
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    unit = parts[1] if len(parts) > 1 else "__init__"
    return unit   # kernels/ is installed as polarprune_cuda.kernels: the op layer's backend, below it


def _graph():
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_unit_has_a_floor():
    assert {_unit(m) for m in _graph()} <= set(FLOORS)


def test_layers_import_only_downwards():
    wrong = []
    for module, targets in _graph().items():
        for t in targets:
            if t == "polarprune_cuda":
                wrong.append(f"{module} -> the package's face")
                continue
            a, b = _unit(module), _unit(t)
            if a != b and FLOORS[b] >= FLOORS[a]:
                wrong.append(f"{module} (floor {FLOORS[a]}) -> {t} (floor {FLOORS[b]})")
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, ()):
            if t.endswith("__init__") or t == "polarprune_cuda":
                continue
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state and m != "polarprune_cuda":
            visit(m)


def test_kernels_import_nothing_of_the_package_they_are_installed_into():
    """kernels/ is a backend below the op layer: the op layer calls it, never the other way round."""
    graph = _graph()
    wrong = {m: sorted(t for t in targets if not t.startswith("polarprune_cuda.kernels"))
             for m, targets in graph.items() if m.startswith("polarprune_cuda.kernels")}
    assert not {m: t for m, t in wrong.items() if t}, wrong
    for path in (ROOT / "kernels").glob("*.py"):
        assert "polarprune_cuda" not in "".join(ast.unparse(n) for n in ast.walk(ast.parse(path.read_text()))
                                                if isinstance(n, (ast.Import, ast.ImportFrom))), path


def test_the_library_imports_none_of_the_applications_dependencies():
    code = ("import sys, polarprune_cuda as pp, polarprune_cuda.surgery, polarprune_cuda.sparse.fggp; "
            "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))")   # tqdm: torch-pruning's
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_core_install_requires_only_torch_torch_pruning_numpy():
    import re
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = sorted(re.split(r"[<>=!~ ]", r, maxsplit=1)[0] for r in meta["project"]["dependencies"])
    assert names == ["numpy", "torch", "torch-pruning"], names
    # setup.py adds the extension only: no second list of dependencies or packages to drift from pyproject.toml
    text = (ROOT / "setup.py").read_text()
    assert "install_requires" not in text and "packages=" not in text
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    assert meta["tool"]["setuptools"]["package-dir"]["polarprune_cuda.kernels"] == "kernels"


def _internal_import(node: ast.ImportFrom) -> bool:
    return node.module != "__future__" and bool(node.level or (node.module or "").startswith("polarprune_cuda"))


def test_no_module_uses_another_modules_private_names():
    """A leading underscore means private to its file: no module imports one from another module of the package,
    nor reads one through a module it imported (``shrink_mod._removed``). What is shared has a public name."""
    bad = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _internal_import(node):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{module} imports {a.name} from {node.module or '.'}")
                    aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("polarprune_cuda")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{module} reads {node.value.id}.{node.attr}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_top_level_imports_only_the_subpackages_faces():
    """``polarprune_cuda/__init__.py`` takes its names from each subpackage's ``__init__`` (its face) or from a
    top-level module, never from a file inside a subpackage."""
    subpackages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    top_modules = {p.stem for p in PKG.glob("*.py")}
    bad = []
    for node in ast.parse((PKG / "__init__.py").read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [a.name for a in node.names] if node.module is None else [node.module]
            bad += [n for n in names if n not in subpackages | top_modules]
    assert not bad, bad
    for name in subpackages - {"kernels"}:
        face = ast.parse((PKG / name / "__init__.py").read_text())
        exported = [n for n in face.body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        assert exported, f"{name}/__init__.py has no __all__: a subpackage's face lists its public names"


def test_numbers_and_targets_are_checked_by_the_one_checker():
    """``ops.common.is_number`` (a finite int or float, not a bool) and ``check_target_sparsity`` are the checks;
    no module writes its own ``isinstance(v, bool) or not isinstance(v, (int, float))``."""
    pattern = re.compile(r"isinstance\(\w+, bool\) or not isinstance\(\w+, \(int, float\)\)")
    copies = [str(path.relative_to(ROOT)) for path in _modules().values()
              if path.name != "common.py" and pattern.search(path.read_text())]
    assert not copies, copies
    from polarprune_cuda.ops.common import check_target_sparsity, is_number

    assert [is_number(v) for v in (1, 0.5, True, float("nan"), float("inf"), "1")] == [True, True, False, False,
                                                                                     False, False]
    for bad in (1.0, -0.1, True, float("nan")):
        with pytest.raises(ValueError, match=r"target_sparsity must be a number in \[0, 1\)"):
            check_target_sparsity(bad)
