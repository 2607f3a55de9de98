"""Simulation evaluation: seeded parallel rollouts, success scoring with Wilson intervals, reports, videos.

``evaluate(policy, env_cfg, eval_cfg, out_dir=None) -> EvalResult``; ``run.run_evaluate`` is the CLI
path. Importing this package does not import torch (rollout workers import it too).
"""

from vla_ft.eval.evaluate import EvalResult, evaluate
from vla_ft.eval.policies import ExpertPolicy, RandomPolicy
from vla_ft.eval.scoring import EpisodeResult, wilson_interval

__all__ = ["EpisodeResult", "EvalResult", "ExpertPolicy", "RandomPolicy", "evaluate", "wilson_interval"]
