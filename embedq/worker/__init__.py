"""The worker process: read, encode, write, ack; its stages, and launch (the root)."""
