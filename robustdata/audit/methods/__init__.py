"""The audit-method registry: one object per method, found by name (DESIGN.md section 6).

Every module of this package except `base` holds one audit method: a subclass
of base.Method whose `name` is the module's name, registered with @register
when the module is imported. So the method names are the module names, and
robustdata.config lists them (AuditMethod) from the package's files without
importing torch; the first lookup imports every module. Adding a method is
adding one module here and its test.

This module stays light (no torch): the config imports it. (A method module
named `filter` becomes an attribute of this package once imported, shadowing
the builtin in this namespace: don't call the builtin here.)
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, TypeVar

from robustdata.errors import RobustDataError

if TYPE_CHECKING:
    from robustdata.audit.methods.base import Method

    M = TypeVar("M", bound=type[Method])

SUPPORT_MODULES = frozenset({"base"})  # modules of this package that define no method
_REGISTRY: dict[str, "Method"] = {}    # name -> method, filled by @register as each module is imported


def method_names() -> tuple[str, ...]:
    """Every method's name, sorted: the modules of this package (none is imported)."""
    return tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)
                        if module.name not in SUPPORT_MODULES and not module.name.startswith("_")))


def register(cls: "M") -> "M":
    """Class decorator: register one instance of an audit method under its name, which must be its module's."""
    module = cls.__module__.rpartition(".")[2]
    if cls.name != module:
        raise RobustDataError(f"audit method {cls.__name__} is named {cls.name!r} but lives in module {module!r}: "
                              "a method's name is its module's (the config lists the modules)")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]).__qualname__ != cls.__qualname__:
        raise RobustDataError(f"two audit methods are named {cls.name!r}: {type(_REGISTRY[cls.name])} and {cls}")
    _REGISTRY[cls.name] = cls()
    return cls


def registry() -> dict[str, "Method"]:
    """name -> method, in the order the audit runs them on each class (Method.order)."""
    for name in method_names():
        importlib.import_module(f"{__name__}.{name}")
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].order))


def get_method(name: str) -> "Method":
    """The method called `name`; an unknown name raises an error listing the valid ones."""
    methods = registry()
    if name not in methods:
        raise RobustDataError(f"unknown audit method {name!r}; valid: {list(methods)}")
    return methods[name]
