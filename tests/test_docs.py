"""The README's commands are the ones CI runs."""
from __future__ import annotations

import re

from tests.paths import REPO


def test_ci_runs_the_readme_test_command_which_installs_the_test_extras():
    command = re.search(r"^TEST_COMMAND='(.+)'$", (REPO / ".ci" / "run").read_text(), re.M).group(1)
    assert f"```bash\n{command}\n```" in (REPO / "README.md").read_text()
    assert '".[test]"' in command and command.endswith("python -m pytest -q")


def test_the_readme_names_every_system_package_ci_installs():
    packages = re.search(r"^APT_PACKAGES=\((.+)\)$", (REPO / ".ci" / "run").read_text(), re.M).group(1)
    assert f"those with apt first: `{packages}`" in (REPO / "README.md").read_text()
