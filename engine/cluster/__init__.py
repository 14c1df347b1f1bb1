"""Where project commands run: this machine (``LocalExecutor``) or a Ray cluster (``RayExecutor``).

Ray is an optional extra (``pip install "looptree[ray]"``); nothing here imports it until a run
asks for ``cluster.backend = "ray"``.
"""
