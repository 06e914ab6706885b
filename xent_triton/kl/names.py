"""The KL family's renamed arguments (issue 17's naming rules), old -> new, for
``core.renames.renamed_keywords``, which keeps each old keyword working for a deprecation period.

Old -> new: ``student_logits`` -> ``input``, ``teacher_logits`` -> ``teacher_input``, ``labels`` /
``tokens`` -> ``target``, ``logits`` / ``hidden`` / ``student_hidden`` -> ``input``, ``weight`` /
``student_weight`` -> ``linear_weight``, ``bias`` / ``student_bias`` -> ``linear_bias``,
``teacher_hidden`` -> ``teacher_input``, ``teacher_weight`` -> ``teacher_linear_weight``,
``teacher_bias`` -> ``teacher_linear_bias``.
"""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

LOGITS = {"student_logits": "input", "teacher_logits": "teacher_input", "labels": "target"}
LOGPROBS = {"logits": "input", "tokens": "target"}
LINEAR_DISTILL = {"student_hidden": "input", "student_weight": "linear_weight",
                  "teacher_hidden": "teacher_input", "teacher_weight": "teacher_linear_weight",
                  "labels": "target", "student_bias": "linear_bias", "teacher_bias": "teacher_linear_bias"}
LINEAR_LOGPROBS = {"hidden": "input", "weight": "linear_weight", "tokens": "target", "bias": "linear_bias"}
