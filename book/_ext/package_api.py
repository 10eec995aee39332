"""The ``package-api`` directive: one autodoc section per module of a package, found on disk.

``.. package-api:: reference`` documents the package's own docstring and then every module
under it (subpackages included, private ``_name`` modules skipped) with ``automodule``, in
file-name order. A module added to the package shows up on the API page with no edit to
the book; a module that fails to import fails the build.
"""

from __future__ import annotations

import importlib
import pkgutil

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def package_modules(package_name: str) -> list[str]:
    """Dotted names of every public module under ``package_name``, sorted, package excluded."""
    package = importlib.import_module(package_name)
    if not hasattr(package, "__path__"):
        raise ValueError(f"{package_name} is a module, not a package")
    found = pkgutil.walk_packages(package.__path__, prefix=f"{package_name}.")
    names = [info.name for info in found]
    return sorted(n for n in names if not any(p.startswith("_") for p in n.split(".")))


def _automodule(name: str, members: bool) -> list[str]:
    lines = [f".. automodule:: {name}"]
    if members:
        lines += ["   :members:", "   :show-inheritance:"]
    return lines + [""]


class PackageApi(SphinxDirective):
    """Expand to the package docstring plus one titled ``automodule`` section per module."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        package_name = self.arguments[0]
        lines = _automodule(package_name, members=False)
        for name in package_modules(package_name):
            lines += [name, "~" * len(name), ""]
            lines += _automodule(name, members=True)
        container = nodes.container()
        source = self.get_source_info()[0]
        content = StringList(lines, source=f"{source}:package-api:{package_name}")
        nested_parse_with_titles(self.state, content, container)
        return container.children


def setup(app: Sphinx) -> dict:
    app.add_directive("package-api", PackageApi)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
