"""Eval suites: many models x many tasks from one YAML file, with reports and plots.

    from llmquant.eval.suite import SuiteConfig, run_suite
    run_suite("configs/eval/demo.yaml", "runs/demo")

config.py (the YAML file's objects), models.py (source / quantize / bitsandbytes / URL),
tasks.py (one task on one model), runner.py (reuse, failures, results.json), report.py
(report.md), plots.py (PNGs).
"""

from llmquant.eval.suite.config import ModelSpec, SuiteConfig, TaskSpec
from llmquant.eval.suite.runner import run_suite

__all__ = ["ModelSpec", "SuiteConfig", "TaskSpec", "run_suite"]
