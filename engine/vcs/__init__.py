"""Git: the project's repository, a worktree and a branch per node, the git-state guard."""
