"""Two touches to the notebook pages, applied to the doctree (the notebooks are untouched).

* Printed library source (a cell that prints ``inspect.getsource(...)``) is a plain text
  stream in the notebook; here an output that starts like Python source (``def``,
  ``class``, a decorator) is highlighted as Python.
* A ``# NBVAL_IGNORE_OUTPUT`` first line (nbval's comment marker, still used by the
  notebooks that carry no ``nbval-ignore-output`` tag) is dropped from the shown source:
  it is for the test runner, not for readers.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.application import Sphinx

PYTHON_STARTS = ("def ", "class ", "@", "async def ")
NBVAL_MARKER = "# NBVAL_IGNORE_OUTPUT"


def _polish(app: Sphinx, doctree: nodes.document) -> None:
    for block in list(doctree.findall(nodes.literal_block)):
        text = block.astext()
        classes = set(block.get("classes", []))
        if "output" in classes and text.lstrip().startswith(PYTHON_STARTS):
            block["language"] = "python"
        elif text.startswith(NBVAL_MARKER):
            rest = text[len(NBVAL_MARKER):].lstrip("\n")
            block.replace_self(block.__class__(rest, rest, **block.attributes))


def setup(app: Sphinx) -> dict:
    app.connect("doctree-read", _polish)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
