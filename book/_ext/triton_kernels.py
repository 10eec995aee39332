"""autodoc support for Triton kernels: a ``@triton.jit`` function documented like a function.

``triton.jit`` turns a function into a ``JITFunction`` object that autodoc does not
recognise as a function, so ``automodule :members:`` would skip every kernel. This
documenter takes any ``triton`` kernel object (``KernelInterface``) and documents the
Python function it wraps: its signature and its docstring. Like any member, a kernel with
no docstring is left out.
"""

from __future__ import annotations

import inspect
from typing import Any

from sphinx.application import Sphinx
from sphinx.ext.autodoc import FunctionDocumenter
from sphinx.util.inspect import stringify_signature
from triton.runtime.jit import KernelInterface


class TritonKernelDocumenter(FunctionDocumenter):
    """Document a Triton kernel through the function it wraps (its ``fn`` attribute)."""

    objtype = "tritonkernel"
    directivetype = "function"
    priority = FunctionDocumenter.priority + 1

    @classmethod
    def can_document_member(cls, member: Any, membername: str, isattr: bool, parent: Any) -> bool:
        return isinstance(member, KernelInterface) and inspect.isfunction(
            getattr(member, "fn", None)
        )

    def format_args(self, **kwargs: Any) -> str:
        return stringify_signature(inspect.signature(self.object.fn), **kwargs)

    def get_doc(self) -> list[list[str]]:
        doc = inspect.getdoc(self.object.fn)
        return [doc.splitlines()] if doc else []


def setup(app: Sphinx) -> dict:
    app.setup_extension("sphinx.ext.autodoc")
    app.add_autodocumenter(TritonKernelDocumenter)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
