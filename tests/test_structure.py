"""The house: the TP's scripts at the root, the machinery in tp4/, tools in tools/; imports point
down (scripts -> tp4 -> exercise modules), every command listed once in the README, style holds."""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
from helpers import REPO

# The root: what a user runs and reads for the TP. The exercise modules import no project module,
# but for tp4.startup (TensorFlow's start-up notices filtered) under
# `with contextlib.suppress(ImportError)`, so that each still runs when copied on its own.
EXERCISES = {"unet", "metrics", "losses", "data"}
CONSOLE = {"tp4.startup"}
SCRIPTS = {"train", "conv3d", "predict", "report", "plan"}
FILES = sorted(
    path.relative_to(REPO)
    for folder in (".", "tp4", "tools")
    for path in (REPO / folder).glob("*.py" if folder == "." else "**/*.py")
)


def _module(path):
    return ".".join(path.with_suffix("").parts).removesuffix(".__init__")


MODULES = {_module(path): path for path in FILES}


def _imported(node):
    """The project modules an import node names."""
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    else:
        found = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return {name for name in found if name in MODULES}


def _optional(tree):
    """The import nodes of top-level `with contextlib.suppress(ImportError):` blocks."""
    return {
        node
        for block in tree.body
        if isinstance(block, ast.With)
        and [ast.unparse(item.context_expr) for item in block.items]
        == ["contextlib.suppress(ImportError)"]
        for node in block.body
        if isinstance(node, ast.Import | ast.ImportFrom)
    }


def _project_imports(path):
    """(project modules imported, line numbers of imports not at the top level; an optional import
    of a top-level `with contextlib.suppress(ImportError):` counts as at the top)."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    names, nested, optional = set(), [], _optional(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names |= _imported(node)
        if node not in tree.body and node not in optional:
            nested.append(node.lineno)
    return names, nested


def _floor(module):
    """0: exercise modules, 1: the package, 2: tools and scripts (leaves)."""
    if module in EXERCISES:
        return 0
    return 1 if module.split(".")[0] == "tp4" else 2


def test_the_root_holds_the_tps_scripts_and_nothing_else_of_ours():
    assert {_module(path) for path in FILES if len(path.parts) == 1} == EXERCISES | SCRIPTS


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_are_at_the_top(module):
    names, nested = _project_imports(MODULES[module])
    names.discard("tp4")  # tp4.ROOT: the checkout
    if module in EXERCISES:
        tree = ast.parse((REPO / MODULES[module]).read_text(encoding="utf-8"))
        optional = set().union(*map(_imported, _optional(tree))) - {"tp4"}
        assert names <= optional <= CONSOLE, f"{module}.py, an exercise, imports a project module"
    upward = {
        name
        for name in names
        if (_floor(name) > _floor(module) and name not in CONSOLE) or name in SCRIPTS
    }
    assert not upward, f"{module} imports {upward}: imports point down only"
    if module.startswith("tp4"):
        assert not any(name.startswith("tools") for name in names)
    assert nested == [], f"{module} imports inside a function or block at lines {nested}"


def test_the_package_has_no_import_cycle():
    graph = {
        m: {n for n in _project_imports(p)[0] if n.startswith("tp4.")} for m, p in MODULES.items()
    }
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*path, module])}"
        state[module] = "open"
        for name in graph.get(module, ()):
            visit(name, [*path, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_the_readme_lists_every_command_once():
    """A module with a __main__ is a command: the README's table of commands lists each one."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Every command") :].split("\n## ")[0]
    rows = [line.split("|")[2] for line in table.splitlines() if line.startswith("| ")][1:]
    listed = [re.match(r" `python (?:-m )?([\w.]+?)(?:\.py)?[ `]", row).group(1) for row in rows]
    commands = {
        module
        for module, path in MODULES.items()
        if "__main__" in (REPO / path).read_text(encoding="utf-8")
    }
    assert sorted(listed) == sorted(commands)


def test_every_third_party_import_is_a_requirement():
    """Each distribution the code imports is named in requirements.txt (tests: -dev), except torch,
    which tools.bench_pytorch takes where it is installed, for comparisons only."""
    distributions = importlib.metadata.packages_distributions()
    required = set()
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (REPO / name).read_text(encoding="utf-8").splitlines():
            found = re.match(r"^([A-Za-z0-9_.\-]+)", line)
            if found and not line.startswith("-r"):
                required.add(re.sub(r"[-_.]+", "-", found.group(1)).lower())
    code = [*FILES, *(path.relative_to(REPO) for path in (REPO / "tests").glob("**/*.py"))]
    ours = {module.split(".")[0] for module in MODULES} | {"helpers"}
    missing = {}
    for path in code:
        for node in ast.walk(ast.parse((REPO / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in ours or top == "torch":
                    continue
                dists = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(top, [])}
                # tensorflow-cpu provides the module tensorflow
                if dists and not dists & required and not {"tensorflow-cpu"} & dists & required:
                    missing.setdefault(top, set()).add(str(path))
    assert missing == {}


def test_no_configuration_is_rebuilt_from_a_namespace():
    for path in FILES:
        assert "Namespace(**" not in (REPO / path).read_text(encoding="utf-8"), path


def test_importing_the_package_changes_no_environment_variable():
    modules = sorted(m for m in MODULES if m.startswith("tp4") or m in EXERCISES)
    code = f"""
import json, os
import tensorflow, keras, mlflow
before = dict(os.environ)
for name in {modules!r}:
    __import__(name)
print(json.dumps({{k: v for k, v in os.environ.items() if before.get(k) != v}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff_is_clean(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, str(REPO)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_model_saved_before_the_move_still_loads_and_predicts_the_same():
    """tests/fixtures: a U-Net with the fused batch norm saved by the flat layout's code (commit
    39cf95d); its layers are registered under the package name "tp4", whatever their module."""
    from tp4.models import batchnorm  # noqa: F401  (registers the layer)

    fixtures = REPO / "tests" / "fixtures"
    model = keras.models.load_model(fixtures / "unet_fused_before_move.keras")
    assert type(model.get_layer("enc1_bn1")).__name__ == "FusedBatchNormalization"
    np.testing.assert_allclose(
        model.predict(np.load(fixtures / "unet_fused_before_move_input.npy"), verbose=0),
        np.load(fixtures / "unet_fused_before_move_output.npy"),
        atol=1e-6,
    )


def test_mlflow_keras_log_model_with_an_input_example_still_fails(store, tmp_path):
    """MLflow issue #16183, worked around in tp4.tracking.registry.log_keras_model. When this test
    fails, MLflow has fixed it: log with mlflow.keras.log_model there and delete this test."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    mlflow.set_experiment("mlflow-issue-16183")
    with mlflow.start_run(), pytest.raises(FileNotFoundError, match="input_example"):
        mlflow.keras.log_model(model, name="model", input_example=np.zeros((1, 2), np.float32))
