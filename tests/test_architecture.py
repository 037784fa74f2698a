"""The layout holds: layers that run one way, no import cycles, small modules that say what they are for, and
argument / data errors that answer without torch.

The import checks read the code (every ``import`` statement, function-level ones included) rather than trusting
import-linter alone; the import-linter contract itself (``make lint``) is shown failing on a planted import.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import EXAMPLE, REPO

SCRIPTS = ("data_loader_movie_review", "train_distributed_MovieReview", "evaluate_movie_review", "generate_review",
           "import_douban")
MAX_LINES = 450
# Lower layers first; a module may import its own layer and the ones below, never one above.
LAYERS = ("utils", "data", "runs", "inference", "training|evaluation", "testing")


def package_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of review_lm."""
    modules = {}
    for path in sorted((REPO / "review_lm").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports (at any depth of the code), resolved to the package's modules and scripts."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in known or name in SCRIPTS:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for rank, layer in enumerate(LAYERS):
        if parts[1] in layer.split("|"):
            return rank
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_never_imports_a_script():
    offenders = {m: sorted(i & set(SCRIPTS)) for m, i in import_graph().items() if i & set(SCRIPTS)}
    assert not offenders, offenders


def test_no_import_cycle_between_modules_counting_function_level_imports():
    graph = import_graph()
    # Package __init__ files import nothing: a subpackage's modules are imported by their full names.
    assert all(not graph[m] for m in graph if (REPO / m.replace(".", "/") / "__init__.py").exists())
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_layers_run_one_way():
    wrong = []
    for module, imports in import_graph().items():
        mine = layer_of(module)
        for other in imports:
            theirs = layer_of(other)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} ({LAYERS[mine]}) imports {other} ({LAYERS[theirs]})")
            same = mine == theirs and mine is not None and module.split(".")[1] != other.split(".")[1]
            if same:  # training and evaluation share a rank but are independent of each other
                wrong.append(f"{module} imports its sibling layer {other}")
    assert not wrong, "\n".join(wrong)


def test_data_and_runs_import_no_torch_at_module_level():
    heavy = ("torch", "transformers", "accelerate", "peft")
    offenders = []
    for name, path in package_modules().items():
        if layer_of(name) is None or LAYERS[layer_of(name)] not in ("utils", "data", "runs"):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in heavy]
    assert not offenders, offenders


def test_modules_are_small_and_say_what_they_are_for():
    files = [*REPO.glob("*.py"), *(REPO / "review_lm").rglob("*.py"), *REPO.glob("tools/*.py"),
             *REPO.glob("tests/*.py")]
    too_long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text(encoding="utf-8").splitlines()))
                > MAX_LINES}
    assert not too_long, too_long
    undocumented = [str(p.relative_to(REPO)) for p in files
                    if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not undocumented, undocumented


@pytest.mark.slow
def test_import_linter_contract_fails_on_a_planted_import(tmp_path):
    """make lint's contract is not vacuous: a data module importing a script, or a lower layer importing a higher
    one, breaks it; the tree as it is keeps it."""
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter is not installed (make setup installs it)")
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "review_lm", copy / "review_lm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    for script in SCRIPTS[:4]:
        shutil.copy(REPO / f"{script}.py", copy / f"{script}.py")

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([str(lint), "--no-cache"], cwd=copy, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(copy)})

    assert run().returncode == 0
    target = copy / "review_lm" / "data" / "reviews.py"
    clean = target.read_text(encoding="utf-8")
    target.write_text(clean + "\n\ndef _planted():\n    import data_loader_movie_review  # noqa\n", encoding="utf-8")
    planted = run()
    assert planted.returncode != 0 and "The package never imports a top-level script BROKEN" in planted.stdout
    target.write_text(clean + "\n\ndef _planted():\n    from review_lm.training import plan  # noqa\n",
                      encoding="utf-8")
    upward = run()
    assert upward.returncode != 0 and "BROKEN" in upward.stdout and "review_lm.training" in upward.stdout


# ----------------------------------------------------------------------------------------------------------------
# Argument and data errors answer without torch
# ----------------------------------------------------------------------------------------------------------------
BLOCK_HEAVY = textwrap.dedent("""
    import sys

    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "accelerate", "peft", "trl"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Blocked())
""")


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict[str, str]:
    hook = tmp_path_factory.mktemp("block_torch")
    (hook / "sitecustomize.py").write_text(BLOCK_HEAVY, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    return {**env, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}


def bad_data(folder: Path) -> str:
    path = folder / "bad.json"
    path.write_text(json.dumps({"user_profile": {"name": "Y"}, "task": {"task_behavior_collections": [
        {"type": "movie_review", "data": [{"continuation": "好看", "continuation_prefix": "电影A: ",
                                           "timestamp": "not a date"}]}]}}, ensure_ascii=False), encoding="utf-8")
    return str(path)


CASES = {
    "loader, bad ratio": ["data_loader_movie_review.py", EXAMPLE, "--train_ratio", "2"],
    "loader, bad data": ["data_loader_movie_review.py", "{bad}"],
    "train, bad number": ["train_distributed_MovieReview.py", "--data_file", EXAMPLE, "--output_dir", "{out}",
                          "--learning_rate", "-1"],
    "train, bad data": ["train_distributed_MovieReview.py", "--data_file", "{bad}", "--output_dir", "{out}"],
    "train, unknown flag": ["train_distributed_MovieReview.py", "--data_file", EXAMPLE, "--bogus"],
    "evaluate, bad number": ["evaluate_movie_review.py", "--model_dir", "{out}", "--batch_size", "0"],
    "evaluate, missing test file": ["evaluate_movie_review.py", "--test_file", "{out}/none.json", "--predictions",
                                    "{out}/none.jsonl"],
    "generate, bad number": ["generate_review.py", "--model_dir", "{out}", "--movie", "X", "--top_p", "2"],
    "generate, no such run": ["generate_review.py", "--model_dir", "{out}/missing", "--movie", "X"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_argument_and_data_errors_answer_in_one_line_without_torch(case, blocked_env, tmp_path):
    argv = [a.format(bad=bad_data(tmp_path), out=tmp_path / "out") for a in CASES[case]]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=blocked_env, cwd=str(tmp_path), timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "blocked in this test" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_the_block_really_blocks_torch(blocked_env):
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=blocked_env,
                          timeout=60)
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr
