"""Agent replies to file changes: parse edit blocks, match, apply, enforce access rules."""
