"""A merchant's privacy: its persistent ledger and the plans of what it releases (registry.py picks one)."""
