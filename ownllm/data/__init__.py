"""Data: bundled corpora, reading user text, and packing it into token shards."""
