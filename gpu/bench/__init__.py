"""Public helpers that run inside the user's bench process: timing, correctness, metrics CSV."""
