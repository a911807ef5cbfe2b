"""The source tree reads the way tools read it: nothing ignored as build output, imports only point
down (graph → stages → formats and ground), and no import circle, deferred imports included."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stages"

# GitHub's Python .gitignore template (github/gitignore, Python.gitignore): the folder names it ignores
# at any depth, as a user who adds it to a fork would have them. Kept to its directory patterns, the
# ones that can swallow a source folder.
PYTHON_GITIGNORE = """\
__pycache__/
.Python
build/
develop-eggs/
dist/
downloads/
eggs/
.eggs/
lib/
lib64/
parts/
sdist/
var/
wheels/
share/python-wheels/
*.egg-info/
.installed.cfg
*.egg
MANIFEST
htmlcov/
.tox/
.nox/
.cache
.pytest_cache/
cover/
instance/
.scrapy
docs/_build/
target/
.ipynb_checkpoints
profile_default/
.pdm-build/
__pypackages__/
celerybeat-schedule
.env
.venv
env/
venv/
ENV/
env.bak/
venv.bak/
.spyderproject
.spyproject
.ropeproject
/site
.mypy_cache/
.dmypy.json
.pyre/
.pytype/
cython_debug/
.ruff_cache/
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module of the package that `path` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "stages":  # `stages` itself holds only __version__
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def layer(module: str) -> str:
    if module == "stages.graph":
        return "graph"
    for part in ("ground", "formats", "training"):
        if module.startswith(f"stages.{part}"):
            return part
    return "stage"


def test_no_module_of_the_ground_or_formats_imports_a_stage():
    upward = [(m, t) for m, targets in import_graph().items() for t in targets
              if layer(m) in ("ground", "formats", "training") and layer(t) in ("stage", "graph")
              or layer(m) == "stage" and layer(t) == "graph"
              or layer(m) == "ground" and layer(t) == "training"]
    assert upward == []


def test_no_import_circle():
    graph = import_graph()
    circles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_the_walker_sees_deferred_imports():
    """The checks above are only as good as the walker: it must see an import inside a function."""
    assert "stages.ground.errors" in import_graph()["stages.formats.hf"]
    assert "stages.report" in import_graph()["stages.graph"]  # imported inside the report task


def test_github_python_gitignore_ignores_no_source_file(tmp_path):
    repo = tmp_path / "fork"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(repo)], check=True)
    # The working tree's files, committed or not, as a user's fork would hold them.
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.split()
    sources = [f for f in tracked if f.endswith((".py", ".toml", ".md"))]
    (repo / ".gitignore").write_text(PYTHON_GITIGNORE)
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=repo, input="\n".join(sources),
                             capture_output=True, text=True).stdout.split()
    assert sources and ignored == []
