"""Training machinery: the loop (`loop.train`: run folder, DDP, checkpoints, evaluation), one optimisation step
(`step`) and the state that resumes a run (`state`). The method itself lives in `clipzss.method`."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `clipzss.training` was one module before it was a package: its names stay reachable (`train` is this
    # package's entry point; the others warn).
    from clipzss._moved import forward

    return forward(globals(), name, ("clipzss.training.loop",), public=frozenset({"train"}))
