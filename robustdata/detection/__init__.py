"""Backdoor-poison audit over a trained model's representations (DESIGN.md section 4)."""
