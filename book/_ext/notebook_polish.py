"""Printed library source, highlighted: a cell that prints ``inspect.getsource(...)`` makes a
plain text stream in the notebook; on the page an output that starts like Python source
(``def``, ``class``, a decorator) is highlighted as Python. Applied to the doctree (the
notebooks are untouched).
"""

from __future__ import annotations

from docutils import nodes
from sphinx.application import Sphinx

PYTHON_STARTS = ("def ", "class ", "@", "async def ")


def _polish(app: Sphinx, doctree: nodes.document) -> None:
    for block in list(doctree.findall(nodes.literal_block)):
        text = block.astext()
        classes = set(block.get("classes", []))
        if "output" in classes and text.lstrip().startswith(PYTHON_STARTS):
            block["language"] = "python"


def setup(app: Sphinx) -> dict:
    app.connect("doctree-read", _polish)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
