"""The offline harness: federated simulations through Flower's simulation runtime."""
