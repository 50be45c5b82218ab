"""Hydra configs shipped with verl-mtp (``pkg://verl_mtp.conf``)."""
