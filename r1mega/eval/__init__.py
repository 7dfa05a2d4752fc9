"""Evaluation: pass@k, cons@k and response length of a checkpoint on held-out question sets.

    passk.py    the maths: the unbiased pass@k estimator and majority voting over extracted answers
    run.py      k samples per question through a rollout engine, graded by the reward functions
    report.py   per-dataset tables as JSON and markdown
    config.py   the Hydra schema of `r1mega-eval` (r1mega/cli/eval.py)
"""
