"""The one place that knows about differences between Triton releases (3.6 on the lent GPU image, 3.9 in
the CPU lock).  Keep it small: add a shim only when a difference actually bites."""

from __future__ import annotations

import warnings

import numpy as np


def _numpy_refuses_sized_one_to_int() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 1.25 - 2.4 only warn
        try:
            int(np.zeros(1))
        except TypeError:
            return True
    return False


def fix_interpreter_index() -> bool:
    """Let the interpreter (``TRITON_INTERPRET=1``) use a runtime integer as a loop bound again.

    The interpreter holds scalar kernel arguments as NumPy arrays of shape (1,), and Triton 3.6
    turns one into a Python int (``range(0, n, BLOCK)`` in a kernel) with ``int(array)``, which
    NumPy 2.5 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.9
    squeezes first.  Where NumPy refuses, re-set ``__index__`` as 3.9 does, after the interpreter's
    own patch.  Compiled kernels never go through this.  Returns whether the fix was installed now.
    """
    if not _numpy_refuses_sized_one_to_int():
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
