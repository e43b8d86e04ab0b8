"""Kubernetes side of the controller: the TrainingRun operator, the Job builder, the leg backend and status sink."""
