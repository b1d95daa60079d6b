"""What the web process and the worker agree on: the message envelope, event ids, payload types,
periodic definitions, failure records and which listener parameters are injected rather than
emitted. Imports nothing of the package but ``errors``."""
