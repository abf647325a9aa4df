"""Merchant side: the Flower ClientApp, the local trainer, the node's on-disk state."""
