"""Training and evaluation: models with named representation layers, threat models and attacks, the training loop."""
