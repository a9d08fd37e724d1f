"""Training machinery: the loop (`loop.train`, DDP, checkpoints, evaluation), one optimisation step (`step`) and
the state that resumes a run (`state`). The method itself lives in `clipzss.method`."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `clipzss.training` was one module before the package: its public names stay reachable here.
    from clipzss.training import loop

    if name.startswith("_") or not hasattr(loop, name):
        raise AttributeError(f"module 'clipzss.training' has no attribute '{name}'")
    return getattr(loop, name)
