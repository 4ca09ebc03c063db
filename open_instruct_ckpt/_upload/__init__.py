"""Uploads of published checkpoints: the uploader, the `UploadTarget` seam and its targets (stdlib; no torch)."""
