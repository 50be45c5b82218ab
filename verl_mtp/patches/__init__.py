"""Every change verl-mtp makes to verl (and mbridge), one file per concern; ``verl_mtp.plugin``
applies them, nothing else patches verl.

Each patch is wiring only: it checks its target still looks as expected, replaces it with a
few-line wrapper that calls a named function in a feature module, and can be undone exactly
(``verl_mtp.patches.core`` holds the machinery and the record of what is active;
``verl_mtp.patches.catalog`` lists every patch). This package face imports nothing, so the
feature modules that ask ``core`` whether a patch is active do not load the wiring that imports them.
"""
