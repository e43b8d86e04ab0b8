"""Leg backends: where a training leg runs (local processes, Kubernetes Jobs)."""
