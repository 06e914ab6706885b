"""How ``LossOptions`` crosses a ``torch.library`` custom op, and the gradient tuple of a backward.

An op that takes the options declares only its own arguments; ``options_op`` appends every field of
its options class (``LossOptions``, or a subclass such as the KL family's ``KLOptions``) to its
schema as keyword-only arguments, by name and in field order (``options_schema(cls)``). Callers pass
``**opts.flat()``; the implementation, the fake and ``setup_context`` (its ``keyword_only_inputs``)
rebuild the object with ``cls.from_flat``.
Keyword-only arguments take no gradient, so a backward returns one entry per positional input only:
``input_grads`` pads its gradients with None up to that count, read from ``ctx.needs_input_grad``
(the same helper serves the eager ``autograd.Function``s). Adding a field to ``LossOptions`` thus
needs no edit at any op (tests/core/test_op_schema.py).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Iterable, Optional

import torch

from .options import LossOptions

# as torch.library.infer_schema maps annotations (an int may be symbolic under dynamic=True)
SCHEMA_TYPES = {int: "SymInt", float: "float", str: "str", bool: "bool"}


def schema_type(name: str, hint: Any, owner: str = "LossOptions") -> str:
    """The op-schema type of a field annotation: int / float / str / bool, or ``X?`` for Optional[X]."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and len(args) == 2 and type(None) in args:
        return schema_type(name, args[0] if args[1] is type(None) else args[1], owner) + "?"
    if hint not in SCHEMA_TYPES:
        raise TypeError(f"{owner}.{name}: {hint!r} cannot cross an op schema "
                        f"(one of {[t.__name__ for t in SCHEMA_TYPES]} or Optional of one)")
    return SCHEMA_TYPES[hint]


def options_schema(cls: type = LossOptions) -> str:
    """Every field of the options dataclass ``cls`` (``LossOptions`` or a subclass) as op-schema
    arguments: ``SymInt ignore_index, str reduction, ...``."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return ", ".join(f"{schema_type(f.name, hints[f.name], cls.__name__)} {f.name}" for f in fields)


def options_op(name: str, args: str, returns: str, mutates_args: Iterable[str] = (),
               options_cls: type = LossOptions) -> Callable:
    """``torch.library.custom_op`` whose schema is ``(args, *, <options_schema(options_cls)>) ->
    returns``: the decorated function takes ``args`` positionally and the options as ``**options``
    keywords (``options_cls.from_flat(**options)`` rebuilds them)."""
    schema = f"({args}, *, {options_schema(options_cls)}) -> {returns}"
    return torch.library.custom_op(name, mutates_args=tuple(mutates_args), schema=schema)


def input_grads(ctx: Any, *grads: Optional[torch.Tensor]) -> tuple:
    """The gradients of the leading inputs, then None for every other positional input of the op
    (or ``autograd.Function``): the count comes from ``ctx.needs_input_grad``, never by hand."""
    rest = len(ctx.needs_input_grad) - len(grads)
    if rest < 0:
        raise RuntimeError(f"{len(grads)} gradients for {len(ctx.needs_input_grad)} inputs")
    return grads + (None,) * rest
