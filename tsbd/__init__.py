"""tsbd: purify backdoored image classifiers with the Two-Stage Backdoor Defense."""

__version__ = "0.1.0"
