"""The training step's modes, in one registry (light: no torch, so the CLI can offer them as ``choices``).

Each entry is the one-line reason shown in the run's start-of-run block (:func:`swav_fast.runinfo.
step_mode_line`); :class:`swav_fast.step.TrainStep` implements them.
"""
from __future__ import annotations

from pipelines.registry import Registry

#: name -> why one would choose it (``train.step_mode`` / ``--step-mode``)
STEP_MODES: Registry[str] = Registry("step mode")
STEP_MODES.register("eager", "plain PyTorch, starts at once; on a GPU --step-mode compile or graph is faster")
STEP_MODES.register("compile", "torch.compile of forward + loss (the first step compiles)")
STEP_MODES.register("graph", "one CUDA graph per step, captured after warm-up steps")

#: the modes from the simplest to the fastest (the order the docs and ``--help`` list them in)
MODES = ("eager", "compile", "graph")
