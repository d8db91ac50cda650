"""Data pipeline: build (prepare.py), prove (verify.py) and download (download.py) token shards."""
