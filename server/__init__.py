"""Server side: the Flower ServerApp, the FedAvg strategy over ad parameters, checkpoints."""
