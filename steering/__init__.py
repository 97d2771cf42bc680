"""steering: change what the model does, and measure it."""

from steering.apply import generate, generate_tokens, steer
from steering.das import DASResult, split_pairs, train_das
from steering.east import EAST, decision_states
from steering.experts import ExpertScores, ExpertSwitch, capture_routing, random_control
from steering.illusion import IllusionReport, illusion_diagnostics, split_direction
from steering.inlp import INLP, Projection
from steering.padding import Padded, pad_prompts
from steering.patching import Patch, PatchingGrid, head_patching, patch, patching_grid, run_patch, subspace_patch
from steering.vectors import SteeringVector

__all__ = ["DASResult", "EAST", "ExpertScores", "ExpertSwitch", "INLP", "IllusionReport", "Padded", "Patch", "PatchingGrid",
           "Projection", "SteeringVector", "capture_routing", "decision_states", "generate", "generate_tokens", "head_patching", "illusion_diagnostics",
           "pad_prompts", "patch", "patching_grid", "random_control", "run_patch", "split_direction", "split_pairs",
           "steer", "subspace_patch", "train_das"]
