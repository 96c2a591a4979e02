"""The grid: expanding task × mechanism × scale × seed into cells and running them (``sweep``),
each in its own process (``launcher``, Hydra's ``hydra/launcher=process``), with one progress line
(``progress``). Builds on ``harness.train``."""

from harness.grid.sweep import expand, plan

__all__ = ["expand", "plan"]
