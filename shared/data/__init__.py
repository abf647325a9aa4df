"""Interaction logs and the public ad catalog: schema, loaders, synthetic data, shards."""
