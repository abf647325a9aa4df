"""Code both sides of fedads use: data schema and loaders, model, metrics, config, storage."""
