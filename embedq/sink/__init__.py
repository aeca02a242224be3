"""Milvus: the collection, columnar upserts, schema, error codes, search, digests."""
