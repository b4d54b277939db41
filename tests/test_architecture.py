"""The house stays as docs/architecture.md draws it: one package (wing) per concern, imports
running one way (top to bottom of LAYERS) with no circle, each wing naming its public API, and
advgkl 0.1's flat module paths refused with their new place. The imports are read with `ast`, so
lazy imports inside functions and TYPE_CHECKING blocks count too."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import advgkl

PACKAGE = Path(advgkl.__file__).parent
# Top to bottom: a module may import from its own wing or from a wing below it, never above.
# "plumbing" is the shared modules at advgkl/'s top level (checkpoint, errors, rng, ...).
LAYERS = ("cli", "training", "studies", "evaluation", "data", "methods", "models", "attacks",
          "losses", "config", "plumbing")
WINGS = LAYERS[:-1]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The module an import of `name` loads (the longest known prefix), if it is ours."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(root: Path) -> set[tuple[str, str, int]]:
    """(importer, imported module, line) for every import of the package's own modules."""
    known, top = modules(root), root.name
    edges = set()
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import sub` loads pkg.sub when it is a module, else pkg itself
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                         for a in node.names]
            else:
                continue
            for name in names:
                target = _target(name, known) if name.split(".")[0] == top else None
                if target and target != mod:
                    edges.add((mod, target, node.lineno))
    return edges


def wing(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) > 1 and parts[1] in WINGS:
        return parts[1]
    return "cli" if parts[-1] == "__main__" else "plumbing"


def upward_imports(root: Path) -> list[str]:
    """Each import against the order, as 'importer (wing) -> imported (wing), line N'."""
    found = []
    for mod, target, line in sorted(import_edges(root)):
        if LAYERS.index(wing(target)) < LAYERS.index(wing(mod)):
            found.append(f"{mod} ({wing(mod)}) -> {target} ({wing(target)}), line {line}")
    return found


def circles(root: Path) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in modules(root)}
    for mod, target, _ in import_edges(root):
        graph[mod].add(target)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_run_one_way_from_the_cli_down_to_the_plumbing():
    assert upward_imports(PACKAGE) == []


def test_no_module_imports_itself_back_through_a_circle():
    assert circles(PACKAGE) == []


def test_every_module_lives_in_a_wing_or_is_plumbing():
    plumbing = sorted(m for m in modules(PACKAGE) if wing(m) == "plumbing")
    assert plumbing == ["advgkl", "advgkl.checkpoint", "advgkl.compat", "advgkl.distributed",
                        "advgkl.errors", "advgkl.legacy_autoattack", "advgkl.machine",
                        "advgkl.reference", "advgkl.rng", "advgkl.runlog"]
    assert {wing(m) for m in modules(PACKAGE)} == set(LAYERS)


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "advgkl"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_find_a_planted_upward_import_and_a_planted_circle(tmp_path):
    root = _plant(tmp_path, {
        "__init__.py": "", "errors.py": "",
        "attacks/__init__.py": "", "attacks/pgd.py": "from advgkl.losses import f\n",
        "losses/__init__.py": "def f(): pass\n",
        "evaluation/__init__.py": "", "evaluation/job.py": "import advgkl.errors\n",
        "models/__init__.py": "",
        "models/zoo.py": "def load():\n    from advgkl.evaluation import job\n",
        "methods/__init__.py": "", "methods/a.py": "from advgkl.methods.b import x\n",
        "methods/b.py": "from .a import y\n"})
    assert upward_imports(root) == [
        "advgkl.models.zoo (models) -> advgkl.evaluation.job (evaluation), line 2"]
    assert circles(root) == [["advgkl.methods.a", "advgkl.methods.b"]]


@pytest.mark.parametrize("wing_name", WINGS)
def test_each_wing_says_what_lives_there_and_names_its_public_api(wing_name):
    package = importlib.import_module(f"advgkl.{wing_name}")
    assert package.__doc__ and len(package.__doc__.split()) >= 10
    if wing_name != "models":   # the registry itself is the models wing's face
        assert package.__all__ and all(hasattr(package, name) for name in package.__all__)


def test_old_flat_module_paths_fail_naming_the_new_one():
    code = ("import advgkl\n"
            "for old, new in advgkl.MOVED.items():\n"
            "    try:\n"
            "        __import__(f'advgkl.{old}')\n"
            "    except ImportError as exc:\n"
            "        assert f'moved to advgkl.{new}' in str(exc), exc\n"
            "        __import__(f'advgkl.{new}')\n"
            "    else:\n"
            "        raise AssertionError(old)\n"
            "from advgkl.losses import gkl_loss\n"
            "from advgkl.methods import METHODS\n"
            "from advgkl.attacks import PGDAttack, attack_schedule\n"
            "print(len(advgkl.MOVED))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 30
