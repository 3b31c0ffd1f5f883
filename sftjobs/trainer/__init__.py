"""Code that runs inside the training processes (torchrun workers) and the registry of what it patches."""
