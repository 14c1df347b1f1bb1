"""A run's lifecycle: the engine, the search, control commands, printers and reports."""
