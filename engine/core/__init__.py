"""The run's data: config, the event log and its schema, the state fold, run paths."""
