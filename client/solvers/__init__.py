"""The MF solvers' client halves: the user step and the ad step's local update (registry.py picks one)."""
