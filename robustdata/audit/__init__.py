"""The poisoning audit (DESIGN.md section 4): representations, the audit methods that score them
(methods/), the per-class decisions (scoring.py) and verdicts (verdicts.py), the streaming audit, the
results tables and the detection metrics. The attacks it is tested against live in robustdata.poison."""
