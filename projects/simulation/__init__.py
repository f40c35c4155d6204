"""Simulation of the human side: the ground-truth oracle, the demo, a local Label Studio."""
