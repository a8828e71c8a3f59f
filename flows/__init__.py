"""Prefect flows: the order of steps, parallelism, retries, artifacts."""
