"""``python -m harness.train <overrides>``: one cell, as the grid's processes run it (Hydra's entry
point, ``harness.train.run.main``; ``--multirun`` for a sweep). Not ``python -m harness.train.run``:
the package imports that module first, so running it as ``__main__`` would load it twice."""

from harness.train.run import main

if __name__ == "__main__":
    main()
