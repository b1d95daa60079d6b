"""What the web process and the worker agree on: the message envelope, event ids, payload types,
periodic definitions and failure records. Imports nothing of the package but ``errors``."""
