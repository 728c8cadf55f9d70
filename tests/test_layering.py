"""The package reads as its pipeline: stages import only downward (cache <- extract, cache <- model <-
index; what stages share lives beneath them), no import circle, light modules stay free of torch.

Imports are read from the source with ast, so a lazy import inside a function counts as much as one
at the top of a module."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from waiting import HANG_GUARD_S

PACKAGE = Path(__file__).resolve().parents[1] / "vlpcache"

# what each stage may import; "shared" is every top-level module but the command table
ALLOWED = {
    "shared": {"shared"},
    "cache": {"shared", "cache"},
    "extract": {"shared", "cache", "extract"},
    "model": {"shared", "cache", "model"},
    "index": {"shared", "cache", "model", "index"},
    "serve": {"shared", "cache", "extract", "index", "serve"},  # frames re-decoded as extract decodes them
    "cli": {"shared", "cache", "extract", "model", "index", "serve", "cli"},
}
LONGEST_FUNCTION = 80  # lines
LONG_FUNCTIONS_ALLOWED = {"vlpcache/model/train.py"}  # the training loop is being split into steps


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The vlpcache modules a file imports anywhere in it (`from a.b import c` counts a.b.c if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; write vlpcache.… in full"
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != "vlpcache"}
    return found


def stage(name: str) -> str:
    parts = name.split(".")
    if name in ("vlpcache", "vlpcache.cli", "vlpcache.__main__"):  # the package's API, the command table
        return "cli"
    return parts[1] if len(parts) > 2 or parts[1] in ("cache", "extract", "model", "index", "serve") else "shared"


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, known) for name, path in known.items()}


def test_stages_import_only_downward():
    wrong = [f"{name} ({stage(name)}) imports {other} ({stage(other)})"
             for name, targets in import_graph().items() for other in sorted(targets)
             if stage(other) not in ALLOWED[stage(name)]]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    circles = []

    def visit(name: str, path: list[str]) -> None:
        for other in graph[name]:
            if other in path:
                circles.append(" -> ".join(path[path.index(other):] + [other]))
            elif other not in done:
                visit(other, path + [other])
        done.add(name)

    done: set[str] = set()
    for name in graph:
        if name not in done:
            visit(name, [name])
    assert not circles, "\n".join(sorted(set(circles)))


def test_functions_fit_on_a_screen_or_two():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and relative not in LONG_FUNCTIONS_ALLOWED:
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    long.append(f"{relative}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


def unused_imports(path: Path) -> list[str]:
    """"FILE:LINE NAME" of each name a module imports and nowhere uses, in its code or a quoted annotation
    ("Captions"), as pyflakes finds them (its F401)."""
    tree = ast.parse(path.read_text())
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", None) != "__future__":
            for alias in node.names:
                imported[(alias.asname or alias.name).split(".")[0]] = node.lineno
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns]
    quoted = [ast.parse(c.value, mode="eval") for a in annotations for c in ast.walk(a)
              if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    used = {n.id for t in [tree, *quoted] for n in ast.walk(t) if isinstance(n, ast.Name)}
    return [f"{path.relative_to(PACKAGE.parent)}:{line} {name}" for name, line in imported.items() if name not in used]


def test_no_module_imports_a_name_it_does_not_use():
    # a name kept only for others to import from here (yolox.py's file names) is imported from its own module
    # instead; __init__.py files, which gather a package's names, aside
    assert [found for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__init__.py"
            for found in unused_imports(path)] == []


def test_the_command_line_and_torch_free_modules_load_without_torch():
    light = ["vlpcache.cli", "vlpcache.cache.inspect", "vlpcache.cache.labels", "vlpcache.extract.detectors.spec",
             "vlpcache.extract.detectors.weights", "vlpcache.extract.detectors.models_folder",
             "vlpcache.extract.detectors.yolox_graph", "vlpcache.downloads",
             "vlpcache.extract.options", "vlpcache.extract.render", "vlpcache.model.run_layout", "vlpcache.model.config",
             "vlpcache.model.inspect_run",
             "vlpcache.querybank",
             "vlpcache.index.layout", "vlpcache.index.search", "vlpcache.serve.app", "vlpcache.serve.command",
             "vlpcache.serve.thumbnails"]
    probe = "import sys\n" + "".join(f"import {m}\n" for m in light) + "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tests_run_in_a_workspace_of_their_own_never_the_current_directorys():
    from vlpcache.workspace import Workspace

    root = Workspace().root.resolve()
    assert root != (Path.cwd() / ".vlpcache").resolve()
    assert Path(os.environ["VLPCACHE_WORKSPACE"]).resolve() == root and not root.exists()


def _runs_python_in_a_fork(node: ast.AST) -> bool:
    """A call with a preexec_fn, or os.fork / os.forkpty."""
    if not isinstance(node, ast.Call):
        return False
    forks = (isinstance(node.func, ast.Attribute) and node.func.attr in ("fork", "forkpty")
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "os")
    return forks or any(keyword.arg == "preexec_fn" for keyword in node.keywords)


def test_no_test_runs_python_in_a_forked_child_of_the_test_process():
    # the test process has threads (pytest-xdist's, tqdm's monitor, the page's thumbnail pool, Ray's): a child forked
    # from it that runs Python may wait for ever on what they held, and CI's suite hung in one until its time ran
    # out; tests/as_a_shell.py starts a command with its signals and limits set instead
    found = [f"{path.name}:{node.lineno}" for path in sorted(Path(__file__).parent.glob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if _runs_python_in_a_fork(node)]
    assert found == [], found
