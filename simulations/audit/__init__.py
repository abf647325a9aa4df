"""A one-run privacy audit of the federated trainer (Steinke, Nasr and Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023).

    python -m simulations.audit EXPERIMENT.toml [--output DIR] [--canaries M] [--epsilons E ...] [--solvers als sgd] [--no-dp]

m canary users, each with its own new ad in the (public) catalog, are each put into the
training data with probability 1/2; training runs with the experiment's settings; the server's
released model scores each canary, and the guesses made from those scores give an empirical
lower bound on epsilon at 95% confidence, reported next to the claimed epsilon.

One module per concern: `canaries` (the canary users and the augmented dataset), `statistics`
(guesses, p-value and the lower bound), `runs` (the audit runs through the harness's warm
simulation runtime, and each run's score and delta), `figures` (plot and tables, also used by
simulations/report.py), `command` (the command line and the audit's outputs). This package
module imports none of them, so that they can import each other without a circle.
"""
