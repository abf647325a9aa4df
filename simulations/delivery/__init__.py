"""The closed loop of ad delivery (issue 18): serve slates, simulate responses, evaluate effects.

world      the simulated users' responses (clicks, purchases) from the synthetic ground truth
policies   slate policies: the federated model, local-only, popularity, random; exploration
loop       rounds of federated training, each followed by a round of delivery into the logs
ab_test    stable user splits and uplift with confidence intervals and a significance test
fairness   advertiser exposure, its Gini coefficient, per-merchant uplift
"""
