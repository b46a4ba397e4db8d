"""Paper claims as multi-seed experiments with verdicts (``moelab reproduce``).

Layout: ``spec`` (Experiment, Arm, Claim, Metric, Profile), ``keys`` (every config key used),
``excitation`` (the Excitation paper's experiments), ``registry`` (names -> experiments),
``runner`` (runs: plan, skip / resume / record failures, parallel workers), ``stats``
(summaries, paired t CIs, verdicts), ``results`` (aggregation, results.md / .json),
``plots`` (figures), ``suite`` (``reproduce``: the whole pipeline).

Your own experiment::

    from moelab.experiments import Arm, Claim, Experiment, Metric, Profile, register
    register(Experiment(
        name="my-claim", claim="zero_sum beats AdamW", paper="me",
        base="mnist_mlp", arms=(Arm("adamw"), Arm("zs", ("optim.excitation.strategy=zero_sum",))),
        claims=(Claim("zs", "adamw", "higher"),), metrics=(Metric.final("acc"),),
        profiles={"quick": Profile(("train.steps=20",)), "full": Profile(seeds=5)}))
    reproduce(["my-claim"], profile="full", out="repro")
"""

from moelab.experiments.registry import EXPERIMENTS, get_experiment, register
from moelab.experiments.spec import Arm, Claim, Experiment, Metric, Profile
from moelab.experiments.suite import reproduce

__all__ = ["EXPERIMENTS", "Arm", "Claim", "Experiment", "Metric", "Profile", "get_experiment",
           "register", "reproduce"]
