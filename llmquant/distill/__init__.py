"""Make smaller students from a teacher and train them to recover its quality.

    import llmquant
    result = llmquant.distill("org/teacher", student_layers=15, steps=500, output="student/")

See `llmquant.distill.api.distill` for the arguments, and README.md ("Distill").
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """`llmquant.distill` is both this package and the function `llmquant.distill(...)`: Python
    binds a subpackage to its parent's attribute of the same name, so the package forwards calls."""

    def __call__(self, *args, **kwargs):
        from llmquant.distill.api import distill

        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
