"""A whole experiment, end to end: the rounds, then the evaluation, then the report.

The one module that knows all three steps, so that none of them knows another::

    projects.rounds      rounds 1..r (+ the entropy baseline and its comparison, the evaluation pass)
    projects.evaluation.evaluate  every model on every test set -> results.json (takes the experiment
                                  and its layout)
    projects.evaluation.report    results.json -> report/report.html + report.json

``madseg round`` and ``madseg demo`` call :func:`run_experiment`; ``madseg round --report``
calls :func:`evaluate_and_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .evaluation.evaluate import evaluate_experiment
from .experiment import ExperimentConfig
from .layout import ExperimentLayout
from .rounds import RoundRunner, RunOptions, completed_rounds


def render_report(layout: ExperimentLayout, results: dict[str, Any]) -> Path:
    """Render ``<exp dir>/report/report.html`` (+ ``report.json``) from the results; the HTML path."""
    from .evaluation.report import render_report as _render

    return Path(_render(results, layout.report, base_dir=layout.root).html)


def evaluate_and_report(runner: RoundRunner, rounds: int, *, final_eval: bool = True, baseline: bool = True,
                        report: bool = True) -> dict[str, Any]:
    """The evaluation of rounds 1..``rounds`` (``results.json``) and, with ``report``, the report
    (its path under ``"report"`` in the returned results)."""
    results = evaluate_experiment(runner.exp, runner.layout, rounds, final_eval=final_eval, baseline=baseline,
                                  device=runner.options.device, simulated_raters=runner.use_oracle)
    if report:
        results["report"] = str(render_report(runner.layout, results))
    return results


def report_finished_rounds(exp: ExperimentConfig, options: RunOptions | None = None, *,
                           baseline: bool = True) -> dict[str, Any]:
    """``madseg round --report``: evaluate the rounds that finished fine-tuning and render the report."""
    runner = RoundRunner(exp, options or RunOptions())
    return evaluate_and_report(runner, len(completed_rounds(exp.dir)), final_eval=True, baseline=baseline)


def run_experiment(
    exp: ExperimentConfig,
    rounds: int,
    options: RunOptions | None = None,
    *,
    baseline: bool = True,
    final_eval: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Run rounds 1..``rounds`` (resuming), the entropy baseline and its comparison (after round 1,
    when ``[selection] baseline = "entropy"`` and ``baseline``), the evaluation pass (round
    ``rounds + 1``, T only) and the evaluation + report. Returns the results dict."""
    runner = RoundRunner(exp, options or RunOptions())
    for i in range(1, rounds + 1):
        runner.run(runner.mad_plan(i))
        if i == 1 and baseline and exp.selection.baseline == "entropy":
            runner.run(runner.entropy_plan())
            runner.run(runner.compare_plan())
    if final_eval:
        runner.run(runner.mad_plan(rounds + 1, final_eval=True))
    return evaluate_and_report(runner, rounds, final_eval=final_eval, baseline=baseline, report=report)
