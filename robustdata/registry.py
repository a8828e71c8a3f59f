"""Registries whose names are their modules' names: audit methods, backdoor attacks.

A registry is a package in which every module (but its named support modules)
defines one entry, a class with `name` equal to the module's name, registered
with @registry.register when the module is imported. So the names are known
from the package's files without importing any module (the config lists them
without importing torch), and the first lookup imports every module. Adding an
entry is adding one module and its test.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any, Callable, Iterable, TypeVar

from robustdata.errors import RobustDataError

C = TypeVar("C", bound=type)


class Registry:
    """name -> entry for the modules of the package named `package` (read from its __path__ at each call)."""

    def __init__(self, package: str, what: str, support: Iterable[str] = (),
                 make: Callable[[type], Any] = lambda cls: cls) -> None:
        self.package, self.what = package, what
        self.support = frozenset(support)
        self.make = make  # what is stored for a registered class: the class itself, or an instance
        self.entries: dict[str, Any] = {}

    def names(self) -> tuple[str, ...]:
        """Every entry's name, sorted: the package's modules (none is imported)."""
        return tuple(sorted(module.name for module in pkgutil.iter_modules(sys.modules[self.package].__path__)
                            if module.name not in self.support and not module.name.startswith("_")))

    def register(self, cls: C) -> C:
        """Class decorator: register `cls` under its name, which must be its module's."""
        module = cls.__module__.rpartition(".")[2]
        if cls.name != module:
            raise RobustDataError(f"{self.what} {cls.__name__} is named {cls.name!r} but lives in module "
                                  f"{module!r}: an entry's name is its module's (the config lists the modules)")
        known = self.entries.get(cls.name)
        if known is not None and (known if isinstance(known, type) else type(known)).__qualname__ != cls.__qualname__:
            raise RobustDataError(f"two {self.what}s are named {cls.name!r}: {known} and {cls}")
        self.entries[cls.name] = self.make(cls)
        return cls

    def all(self) -> dict[str, Any]:
        """name -> entry, every module imported."""
        for name in self.names():
            importlib.import_module(f"{self.package}.{name}")
        return dict(self.entries)

    def get(self, name: str) -> Any:
        """The entry called `name`; an unknown name raises an error listing the valid ones."""
        entries = self.all()
        if name not in entries:
            raise RobustDataError(f"unknown {self.what} {name!r}; valid: {sorted(entries)}")
        return entries[name]
