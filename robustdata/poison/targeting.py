"""Who a backdoor sends where: each sample's target class, or -1 when the attack leaves it alone.

- all_to_one: every class but the target -> the target (Gu et al. 2017);
- source_specific: only the source classes -> the target (Gu et al. 2017; Tang et al. 2021 "Demon in the
  variant" show why it evades class-level defences: the trigger is not a shortcut for other classes);
- multi_target: two or three targets, the other classes dealt to them in turn (class c, the i-th non-target
  class in order, -> targets[i mod k]);
- all_to_all: y -> y + 1 mod K (Gu et al. 2017's all-to-all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from robustdata.errors import RobustDataError

TargetingKind = Literal["all_to_one", "source_specific", "multi_target", "all_to_all"]
TARGETING_KINDS = ("all_to_one", "source_specific", "multi_target", "all_to_all")


@dataclass(frozen=True)
class Targeting:
    kind: TargetingKind = "all_to_one"
    targets: tuple[int, ...] = (0,)  # all_to_all takes none
    sources: tuple[int, ...] = ()    # source_specific only

    def check(self, num_classes: int) -> None:
        """Refuse a targeting that does not fit `num_classes` classes, saying why."""
        if self.kind not in TARGETING_KINDS:
            raise RobustDataError(f"unknown targeting {self.kind!r}; valid: {list(TARGETING_KINDS)}")
        wanted = {"all_to_one": (1, 1), "source_specific": (1, 1), "multi_target": (2, 3), "all_to_all": (0, 0)}
        low, high = wanted[self.kind]
        if not low <= len(self.targets) <= high:
            raise RobustDataError(f"{self.kind} takes {low}-{high} target classes, got {list(self.targets)}")
        if (self.kind == "source_specific") != bool(self.sources):
            raise RobustDataError("source classes go with source_specific targeting, and only with it"
                                  f" (got {self.kind} with sources {list(self.sources)})")
        for role, classes in (("target", self.targets), ("source", self.sources)):
            for value in classes:
                if not 0 <= value < num_classes:
                    raise RobustDataError(f"{role} class {value} is not a label of this dataset "
                                          f"({num_classes} classes)")
        if len(set(self.targets)) < len(self.targets) or set(self.targets) & set(self.sources):
            raise RobustDataError(f"the target classes {list(self.targets)} must differ from each other and "
                                  f"from the source classes {list(self.sources)}")

    def class_targets(self, num_classes: int) -> torch.Tensor:
        """(num_classes,) long: each class's target, -1 for a class the attack leaves alone."""
        self.check(num_classes)
        table = torch.full((num_classes,), -1, dtype=torch.long)
        if self.kind == "all_to_all":
            return (torch.arange(num_classes) + 1) % num_classes
        if self.kind == "source_specific":
            table[list(self.sources)] = self.targets[0]
            return table
        others = [c for c in range(num_classes) if c not in self.targets]
        for rank, c in enumerate(others):
            table[c] = self.targets[rank % len(self.targets)]
        return table

    def target_of(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(N,) long: each sample's target, -1 where the attack leaves it alone."""
        return self.class_targets(num_classes).to(labels.device)[labels.long()]
