"""Probes read the machine into frozen snapshots; they never judge what they read."""
