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


def _layout_map() -> dict[str, set[str]]:
    """The README's map of pipelines/ (the code block of its Layout section): folder -> the modules
    it names. A line starting a folder is ``pipelines/`` or two spaces and ``name/``; deeper
    indented lines continue the folder above."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Layout\n"):]
    block = section[section.index("```\n") + 4:]
    block = block[:block.index("```")]
    modules: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        start = re.match(r"^(pipelines/|  (\w+)/)\s", line)
        if start:
            folder = "pipelines" if start.group(2) is None else f"pipelines/{start.group(2)}"
            modules[folder] = set()
        assert folder is not None, f"README layout map: {line!r} is under no folder"
        modules[folder] |= set(re.findall(r"\b(\w+)\.py\b", line))
    return modules


def test_the_readme_layout_map_names_every_module_of_pipelines_and_only_those():
    mapped = _layout_map()
    root = REPO / "pipelines"
    folders = {"pipelines"} | {f"pipelines/{p.parent.name}" for p in root.glob("*/__init__.py")}
    assert set(mapped) == folders, "the README map's folders are not those of pipelines/"
    for folder, names in mapped.items():
        present = {p.stem for p in (REPO / folder).glob("*.py")} - {"__init__"}
        assert sorted(present - names) == [], f"{folder}/: modules the README map does not name"
        assert sorted(names - present) == [], f"{folder}/: the README map names modules that do not exist"
