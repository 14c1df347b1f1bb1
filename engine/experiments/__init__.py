"""Comparing agent configurations: A/B experiments, sequential tests, the runs catalog, Pareto fronts."""
