"""Renamed public keywords: the old name keeps working for a deprecation period, with a
``DeprecationWarning`` naming the new one (README, "Renamed arguments")."""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(**new_by_old: str) -> Callable[[F], F]:
    """Decorator: each ``old=`` keyword is passed on as its new name with a ``DeprecationWarning``
    naming the new one; the old and the new name together (the new one by keyword or by position)
    raise ``TypeError``. The signature (``inspect.signature``, type checkers) shows the new names."""
    def decorate(fn: F) -> F:
        params = list(inspect.signature(fn).parameters.values())
        position = {p.name: i for i, p in enumerate(params)
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
        unknown = [new for new in new_by_old.values() if new not in {p.name for p in params}]
        if unknown:
            raise ValueError(f"{fn.__qualname__} has no parameter {unknown}")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old in new_by_old.keys() & kwargs.keys():
                new = new_by_old[old]
                if new in kwargs or position.get(new, len(args)) < len(args):
                    raise TypeError(f"{fn.__qualname__}() got both {new!r} and its deprecated name {old!r}: "
                                    f"pass {new!r} only")
                warnings.warn(f"{fn.__qualname__}(): the keyword {old!r} is deprecated, use {new!r}",
                              DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return cast(F, wrapper)
    return decorate
