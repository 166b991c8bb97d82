"""tsbd: purify backdoored image classifiers with the Two-Stage Backdoor Defense."""

__version__ = "0.1.0"

__all__ = ["__version__", "purify"]


def __getattr__(name: str):
    """``tsbd.purify`` (:func:`tsbd.interop.purify.purify`: purify any ``torch.nn.Module`` with a
    defense, default TSBD, on clean data), imported on first use so that ``import tsbd`` (and
    ``tsbd --help``) loads no torch."""
    if name == "purify":
        from tsbd.interop.purify import purify

        return purify
    raise AttributeError(f"module 'tsbd' has no attribute {name!r}")
