"""The poisoning audit (DESIGN.md section 4): poisoners with ground truth, representations, the audit
methods that score them, the decisions, and the detection metrics."""
