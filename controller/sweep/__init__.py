"""TrainingSweep: hyperparameter search over TrainingRuns (issue 15).

`space` (search space, grid and seeded random search) and `asha` (rungs and promotions) are pure and I/O-free,
so the sweep workflow imports them; `spec` is the TrainingSweep document; `workflow` orchestrates trials;
`activities` reads the trials' eval records from the volume.
"""
