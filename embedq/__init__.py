"""embedq: a queue-driven embedding fleet (Redis Streams → transformer → Milvus)."""

__version__ = "0.1.0"
