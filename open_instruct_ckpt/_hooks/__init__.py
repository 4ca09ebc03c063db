"""What runs after a checkpoint is published, on rank 0: the user's `on_published` hook (stdlib; no torch)."""
