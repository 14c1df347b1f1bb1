"""The dashboard's widgets; each renders one slice of the `RunView` and knows nothing of files."""
