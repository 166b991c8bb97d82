"""tsbd: purify backdoored image classifiers with the Two-Stage Backdoor Defense."""

__version__ = "0.1.0"


def purify(model, clean_data, defense: str = "tsbd", **options):
    """Purify any ``torch.nn.Module`` with ``defense`` (default TSBD) on ``clean_data``; returns the
    :class:`tsbd.defenses.DefenseResult` (``.model`` is the purified copy). See :func:`tsbd.interop.purify`."""
    from tsbd.interop.purify import purify as _purify

    return _purify(model, clean_data, defense, **options)
