"""The offline tools behind the ``verl-mtp`` command (``verl_mtp.cli``): ``explain``, ``demo`` and
``accept_eval``. The CLI imports each only when its command runs."""
