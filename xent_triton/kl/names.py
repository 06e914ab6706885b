"""The KL family's renamed arguments (issue 17's naming rules): ``renamed_keywords`` keeps each old
keyword working for a deprecation period.

Old -> new: ``student_logits`` -> ``input``, ``teacher_logits`` -> ``teacher_input``, ``labels`` /
``tokens`` -> ``target``, ``logits`` / ``hidden`` / ``student_hidden`` -> ``input``, ``weight`` /
``student_weight`` -> ``linear_weight``, ``bias`` / ``student_bias`` -> ``linear_bias``,
``teacher_hidden`` -> ``teacher_input``, ``teacher_weight`` -> ``teacher_linear_weight``,
``teacher_bias`` -> ``teacher_linear_bias``.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

LOGITS = {"student_logits": "input", "teacher_logits": "teacher_input", "labels": "target"}
LOGPROBS = {"logits": "input", "tokens": "target"}
LINEAR_DISTILL = {"student_hidden": "input", "student_weight": "linear_weight",
                  "teacher_hidden": "teacher_input", "teacher_weight": "teacher_linear_weight",
                  "labels": "target", "student_bias": "linear_bias", "teacher_bias": "teacher_linear_bias"}
LINEAR_LOGPROBS = {"hidden": "input", "weight": "linear_weight", "tokens": "target", "bias": "linear_bias"}


def renamed_keywords(old_to_new: dict[str, str]) -> Callable[[F], F]:
    """Accept each old keyword of ``old_to_new`` for its new name, with a ``DeprecationWarning``
    naming the new one; the old and the new one together (by keyword, or the new one by position)
    raise TypeError. The signature seen by ``inspect`` is the function's own (new names only)."""

    def wrap(fn: F) -> F:
        params = list(inspect.signature(fn).parameters)
        name = fn.__qualname__

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs or params.index(new) < len(args):
                    raise TypeError(f"{name}() got both '{old}' (deprecated) and its new name '{new}'")
                warnings.warn(f"{name}(): the keyword '{old}' is deprecated, use '{new}'", DeprecationWarning,
                              stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap
