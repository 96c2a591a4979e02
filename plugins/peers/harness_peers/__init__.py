"""Peer implementations wrapped as harness mechanisms (an external plugin).

Importing this package imports every module in it, and each module registers its peer
(e.g. ``performer_pytorch``, ``nystrom_attention``) through
``harness.core.registry.register_mechanism``; the harness imports the package through the
entry-point group ``harness.mechanisms`` (see this package's pyproject.toml). A new peer is
one new file here: no list to keep in sync.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
