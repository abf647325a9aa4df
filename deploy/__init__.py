"""Deployment of the fedads Flower app: a TLS SuperLink with SuperNode authentication, and
one SuperNode per merchant. See docs/DEPLOYMENT.md."""
