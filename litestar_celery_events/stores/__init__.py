"""Where the library keeps state: the spool (web side, broker outages), the failed-events store and
the delayed-event/beat store. Each has a Redis form (the broker's) and a SQLite form (one machine)."""
