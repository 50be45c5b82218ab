__version__ = "0.1.0"

# Distributions whose versions error reports name (the patched hosts and what they stand on).
REPORTED_DISTRIBUTIONS = ("verl-mtp", "verl", "megatron-core", "mbridge", "torch", "transformers")


def installed_versions() -> dict[str, str]:
    """Installed versions of the packages verl-mtp depends on, for error reports."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in REPORTED_DISTRIBUTIONS:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "not installed"
    return found
