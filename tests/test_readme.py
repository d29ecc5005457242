"""The README's newcomer commands and .ci/run stay in sync."""
import os
import re
import stat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    with open(os.path.join(ROOT, "README.md")) as fh:
        text = fh.read()
    return re.findall(r"```bash\n(.+?)\n```", text.split("\n## ")[0], flags=re.S)


def test_readme_starts_with_the_demo_and_the_test_command():
    demo, tests = _readme_commands()[:2]
    assert demo == "pip install . && bowr demo"
    assert "python -m pytest" in tests and ".[test" in tests


def test_ci_runs_exactly_the_readme_test_command():
    path = os.path.join(ROOT, ".ci", "run")
    assert os.stat(path).st_mode & stat.S_IXUSR
    with open(path) as fh:
        script = fh.read()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert _readme_commands()[1] + " || rc=$?" in script
