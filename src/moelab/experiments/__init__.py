"""Paper claims as multi-seed experiments with verdicts (``moelab reproduce``).

Layout: ``spec`` (Experiment, Arm, Claim, Metric, Profile), ``keys`` (every config key used),
``excitation`` (the Excitation paper's experiments), ``registry`` (names -> experiments),
``runner`` (runs: plan, skip / resume / record failures, parallel workers), ``stats``
(summaries, paired t CIs, verdicts), ``results`` (aggregation, results.md / .json),
``plots`` (figures), ``suite`` (``reproduce``: the whole pipeline).

Your own experiment, in a file ``my_exp.py`` (``moelab reproduce my_exp.py`` runs it; the
worked example is in docs/REPRODUCE.md)::

    from moelab.experiments import Arm, Claim, Experiment, Metric, Profile, register, reproduce
    register(Experiment(
        name="my-claim", claim="zero_sum beats AdamW", paper="me",
        base="mnist_mlp", arms=(Arm("adamw"), Arm("zs", ("optim.excitation.strategy=zero_sum",))),
        claims=(Claim("zs", "adamw", "higher"),), metrics=(Metric.final("acc"),),
        profiles={"quick": Profile(("train.steps=20",)), "full": Profile(seeds=5)}))
    if __name__ == "__main__":   # python my_exp.py: worker processes import this file
        reproduce(["my-claim"], profile="full", out="repro")
"""

from moelab.experiments.registry import EXPERIMENTS, get_experiment, register
from moelab.experiments.spec import Arm, Claim, Experiment, Metric, Profile
from moelab.experiments.suite import reproduce

__all__ = ["EXPERIMENTS", "Arm", "Claim", "Experiment", "Metric", "Profile", "get_experiment",
           "register", "reproduce"]
