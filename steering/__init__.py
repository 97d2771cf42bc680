"""steering: change what the model does, and measure it."""

from steering.apply import generate, generate_tokens, steer
from steering.das import DASResult, train_das
from steering.experts import ExpertScores, ExpertSwitch, capture_routing, random_control
from steering.patching import (
           IllusionReport,
           Patch,
           PatchingGrid,
           illusion_diagnostics,
           patch,
           patching_grid,
           run_patch,
           split_direction,
           subspace_patch,
)
from steering.vectors import SteeringVector

__all__ = ["DASResult", "ExpertScores", "ExpertSwitch", "IllusionReport", "Patch", "PatchingGrid", "SteeringVector",
           "capture_routing", "generate", "generate_tokens", "illusion_diagnostics", "patch", "patching_grid",
           "random_control", "run_patch", "split_direction", "steer", "subspace_patch", "train_das"]
