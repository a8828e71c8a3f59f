"""Backdoor attacks with ground truth: the poison stage, the audit's test cases and its canaries.

Every module of this package except the support modules (base, targeting,
plant) holds one backdoor attack: a base.Backdoor subclass whose `name` is the
module's name, registered with @register (robustdata.registry). So the attack
names are the module names, listed without importing torch; adding an attack
is adding one module here and its test. `plant` poisons a training set with
any of them under any targeting (all-to-one, source-specific, multi-target,
all-to-all) and builds the triggered test set that measures attack success.

This module stays light (no torch): the config imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from robustdata.registry import Registry

if TYPE_CHECKING:
    from robustdata.poison.base import Backdoor

REGISTRY = Registry(__name__, "backdoor attack", support={"base", "targeting", "plant"})
attack_names = REGISTRY.names
register = REGISTRY.register


def backdoor(name: str, options: dict[str, Any] | None = None) -> "Backdoor":
    """The attack called `name` with `options` (its dataclass fields); unknown names and options are refused
    with the valid ones."""
    from robustdata.poison.base import build  # torch: only when an attack is built

    return build(REGISTRY.get(name), options or {})
