"""Weight pruning: magnitude, Wanda and SparseGPT, unstructured or N:M (config/sparsity.py).

    import llmquant
    result = llmquant.prune("org/model", method="sparsegpt", pattern="2:4", output="pruned/")

See `llmquant.prune.api.prune` for the arguments; `llmquant quantize --prune` prunes and quantizes.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """`llmquant.prune` is both this package and the function `llmquant.prune(...)` (Python binds a
    subpackage to its parent's attribute of the same name, so the package forwards calls)."""

    def __call__(self, *args, **kwargs):
        from llmquant.prune.api import prune

        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
