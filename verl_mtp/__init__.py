"""verl-mtp: Multi-Token-Prediction for RL with verl.

Importing this package is cheap and touches neither verl nor megatron-core. verl activates the
plugin through the ``verl.plugins`` entry point (``verl_mtp.plugin``) when ``import verl`` runs.
"""

from verl_mtp.version import __version__

__all__ = ["__version__"]
