"""The library layer never imports Prefect (DESIGN.md section 2)."""

import pkgutil
import subprocess
import sys

import robustdata


def test_library_does_not_import_prefect():
    modules = [m.name for m in pkgutil.walk_packages(robustdata.__path__, "robustdata.")
               if m.name not in ("robustdata.cli", "robustdata.__main__")]
    assert "robustdata.data.shards" in modules
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('prefect' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
