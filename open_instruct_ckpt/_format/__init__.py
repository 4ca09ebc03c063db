"""The on-disk format and its readers: manifest, readers, inspect, verify, load check (stdlib only: the command
line starts fast; the load check imports torch lazily)."""
