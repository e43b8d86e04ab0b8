"""Relay controller: TrainingRun spec, Temporal workflows and activities, backends, operator and CLI (no torch)."""
