"""The layers of DESIGN.md section 2, checked by import-linter (the contracts are in pyproject.toml):
entry points -> flows -> tasks -> library, and the library never imports Prefect. Import-linter reads
every import statement, including the ones inside functions, so a lazy import cannot hide a violation."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports run on the package under `root` (found first on the path) with root's pyproject.toml."""
    env = {"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root), "HOME": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def copy_of_the_package(tmp_path: Path) -> Path:
    """The package (flows/ and tasks/ through its links, copied as files) and the contracts, in tmp_path."""
    shutil.copytree(REPO / "robustdata", tmp_path / "robustdata", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    # the library reaching up to a task, lazily inside a function, as api.py and cli.py once did
    ("robustdata/audit/metrics.py", "def late():\n    from robustdata.tasks.audit import audit_task\n",
     "entry points -> flows -> tasks -> library"),
    ("robustdata/data/shards.py", "import prefect\n", "the library never imports Prefect"),
    # a flow importing the CLI, as the deleted warm runner (flows/warm.py) did
    ("robustdata/flows/ingest.py", "from robustdata.cli import app\n", "entry points -> flows -> tasks -> library"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    root = copy_of_the_package(tmp_path)
    with open(root / module, "a") as f:
        f.write("\n\n" + line)
    result = lint_imports(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{contract} BROKEN" in result.stdout


def test_installing_puts_no_generic_flows_or_tasks_package_on_the_path(tmp_path):
    """A user's own `tasks` package (Celery projects have one) must not be shadowed by ours."""
    code = "import importlib.util as u; print(u.find_spec('flows'), u.find_spec('tasks'), " \
           "u.find_spec('robustdata.flows').name, u.find_spec('robustdata.tasks').name)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["None", "None", "robustdata.flows", "robustdata.tasks"]
