"""Three verdicts, per class and for the whole set: poisoned, clean, or inconclusive.

An audit exists to say "this set is safe to train on", so it must never say
clean when it could not tell. Each class's verdict comes from its separation
statistic D (filtering.py: how cleanly the class splits in two), as a robust z
against the audit's other classes, and from whether the audit could read the
class at all:

- poisoned: the transplant test decided the class (methods/transplant.py: a
  group of its samples carries a pattern that moves other classes' images to
  it; that group is removed), whatever its z; or the dirty-label test did
  (methods/dirty_label.py: the class splits clearly and one part looks like
  other classes in input space; that part is removed); or z above kappa (the audit's
  threshold) and the input-space rule names a poison side of at most
  MAX_POISON_SIDE of the class; its flagged samples are removed;
- inconclusive, when the evidence does not rule out poisoning (and neither test
  decided):
  * z above kappa but the side rule points at most of the class: the class
    splits far more cleanly than the others, but the rule cannot say which side
    is the poison. Dirty-label poisons are at most about half of a class
    (all-to-one at 10% of MNIST: 50.3% of class 0), so a poison side above
    MAX_POISON_SIDE contradicts the split; but clean-label poisons are real
    target images, which the rule misplaces, and a source-specific poison
    cluster can lie far from the other classes too. Natural sub-styles split as
    well: a clean MNIST class 1 does at z 8.7 on one seed of three, so this
    rule costs clean sets a false "inconclusive" now and then (README, Limits);
  * z in the doubt band (KAPPA_DOUBT, kappa]: more separated than clean
    classes were in any measured audit (clean MNIST, 3 seeds: z <= 2.9 once
    the side rule holds), less than the threshold;
  * the classes' median D above CLEAN_MEDIAN_MAX: most classes split more
    cleanly than clean data does, so the across-class calibration (which
    assumes fewer than half of the classes are poisoned) is void; every class
    above that level is inconclusive (all-to-all and multi-target attacks);
  * the transplant test saw a weak flip (transplant.WEAK_FLIP): a pattern of the
    class moves other classes' images to it, less than a learned trigger does,
    more than clean classes' patterns do (a backdoor learned in part);
  * the class could not be audited (too few samples, constant features, a
    numerical failure);
- clean: none of the above (an empty class is clean: it trains nothing).

The whole set is poisoned when any class is, else inconclusive when any class
is, else clean.
"""

from __future__ import annotations

from typing import Any, Iterable

from robustdata.audit.filtering import MAX_POISON_SIDE

POISONED, CLEAN, INCONCLUSIVE = "poisoned", "clean", "inconclusive"
VERDICTS = (CLEAN, INCONCLUSIVE, POISONED)  # in rising order of alarm
KAPPA_DOUBT = 4.0       # robust z above which a class is at least inconclusive
CLEAN_MEDIAN_MAX = 5.0  # a median class separation above this voids the across-class calibration
EMPTY = "empty"


def class_verdict(entry: dict[str, Any], kappa: float, median_separation: float | None) -> tuple[str, list[str]]:
    """(verdict, reasons) of one class's audit entry (status, statistic, z, side_size, n), given the median
    separation of the audit's scored classes (None when none was scored)."""
    status = entry.get("status", "ok")
    if status == EMPTY:
        return CLEAN, ["no samples"]
    if status != "ok" or entry.get("statistic") is None:
        return INCONCLUSIVE, [f"not audited: {status}"]
    transplant, dirty = entry.get("transplant"), entry.get("dirty_label")
    if transplant and transplant["decides"]:
        return POISONED, [transplant_reason(transplant)]
    if dirty and dirty["decides"]:
        return POISONED, [dirty_label_reason(dirty)]
    z, side = entry["z"], entry["side_size"] / entry["n"]
    calibrated = median_separation is None or median_separation <= CLEAN_MEDIAN_MAX
    if not calibrated and entry["statistic"] > CLEAN_MEDIAN_MAX:
        return INCONCLUSIVE, [f"separation {entry['statistic']:.2f} with most classes above {CLEAN_MEDIAN_MAX}: "
                              "the across-class calibration is void (many classes poisoned?)"]
    if z > kappa and side <= MAX_POISON_SIDE:
        return POISONED, [f"separation z {z:.1f} > {kappa:g}"]
    if z > kappa:
        return INCONCLUSIVE, [f"separation z {z:.1f} > {kappa:g}, but the side rule names {side:.0%} of the "
                              "class as the poison side: it cannot tell which side is the poison"]
    if z > KAPPA_DOUBT:
        return INCONCLUSIVE, [f"separation z {z:.1f} in the doubt band ({KAPPA_DOUBT:g}, {kappa:g}]"]
    if transplant:
        return INCONCLUSIVE, [f"{transplant_reason(transplant)}: too weak to decide, too strong to rule out a "
                              "backdoor the model learned in part"]
    return CLEAN, [f"separation z {z:.1f} <= {KAPPA_DOUBT:g}"]


def transplant_reason(transplant: dict[str, Any]) -> str:
    return (f"the pattern of {transplant['group']} of the class ({transplant['pattern_pixels']} px) moves "
            f"{transplant['flip_rate']:.0%} of class {transplant['receiving_class']}'s images to this class "
            f"(the control patterns': {transplant['control_flip_rate']:.0%})")


def dirty_label_reason(dirty: dict[str, Any]) -> str:
    return (f"{dirty['looks_other_share']:.0%} of {dirty['group']} of the class ({dirty['group_size']} samples) look "
            f"like another class in input space (the rest of the class: {dirty['rest_share']:.0%})")


def overall_verdict(verdicts: Iterable[str]) -> str:
    """The set's verdict: the most alarming of its classes' (clean for a set with no class)."""
    return max(verdicts, key=VERDICTS.index, default=CLEAN)
