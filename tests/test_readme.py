"""Every command of README.md (and CLUSTER.md) is run here: a wrong example fails CI.

The quick ones run for real (in this process, in a temporary folder); the long ones (a training, a
benchmark, a server) have their command line parsed by the script's own parser, with its checks.
`mlflow ui` is run by tests/test_mlflow_ui.py, `mlflow models serve` by tests/tp4/serving, the test
command by CI itself.
"""

import importlib
import re
import shlex
import sys

import pytest
from helpers import REPO, write_png_folder

README = (REPO / "README.md").read_text()
CLUSTER = (REPO / "CLUSTER.md").read_text()  # the README's "Beyond one machine", in full
RUN = {"unet", "metrics", "data", "tp4.images.datasets"}  # quick: run them
PARSE = {"train", "conv3d", "predict", "tools.bench", "report", "tools.tracking_server"}


def _commands():
    """The command lines of the README's bash blocks, comments and prompts removed."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README + CLUSTER, re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                found.append(words)
    return found


COMMANDS = _commands()
SCRIPTS = [
    words
    for words in COMMANDS
    if words[0] == "python" and (words[1].endswith(".py") or words[1] == "-m")
]


def _module_and_argv(words):
    """`python train.py ...` or `python -m tools.bench ...`: (module name, arguments)."""
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1].removesuffix(".py"), words[2:]


def test_the_test_command_is_what_ci_runs_and_the_main_command_installs_the_same_way():
    ci = [
        line for line in (REPO / ".ci/run").read_text().splitlines() if line.startswith("python3")
    ]
    main_job, tests = COMMANDS[0], COMMANDS[1]
    assert [tests] == [shlex.split(line) for line in ci]
    install = tests[: tests.index("&&", tests.index("&&") + 1)]  # venv, then pip install
    assert main_job[: len(install)] == [w.replace("-dev", "") for w in install]
    assert main_job[len(install) :] == ["&&", ".venv/bin/python", "train.py"]


def test_every_other_command_is_the_activation_mlflow_ui_or_the_server():
    """The server and a request to it: tests/tp4/serving/test_pyfunc.py runs them."""
    others = [words[:3] for words in COMMANDS[2:] if words not in SCRIPTS]
    assert others == [
        ["source", ".venv/bin/activate"],
        ["mlflow", "ui"],
        ["mlflow", "models", "serve"],
        ["curl", "127.0.0.1:5001/invocations", "-H"],
    ]
    assert {_module_and_argv(words)[0] for words in SCRIPTS} <= RUN | PARSE  # run or parsed below


@pytest.fixture()
def dataset(tmp_path):
    """DIR of the README: a small images/ + masks/ folder."""
    write_png_folder(tmp_path / "DIR", shapes=((32, 32),) * 6)
    return tmp_path / "DIR"


@pytest.mark.parametrize("words", SCRIPTS, ids=[shlex.join(words[1:]) for words in SCRIPTS])
def test_a_readme_command_runs_or_parses(words, dataset, store, monkeypatch, capsys):
    name, argv = _module_and_argv(words)
    argv = [str(dataset) if word == "DIR" else word for word in argv]
    module = importlib.import_module(name)
    if name in RUN:
        monkeypatch.setattr(sys, "argv", [name, *argv])
        module.main()
        assert capsys.readouterr().out.strip()
    elif name == "report":
        module._parser().parse_args(argv)
    else:
        module.parse_args(argv)  # its checks too; a bad flag exits 2


def test_the_readme_reads_in_one_sitting():
    """At most 2,000 words, counted as `wc -w` does: detail goes to REPORT, PERFORMANCE, CLUSTER."""
    assert len(README.split()) <= 2000
