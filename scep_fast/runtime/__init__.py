"""The I/O edge: HTTP, worker processes, batching, storage, logging and the command line.

The only package that imports trio, hypercorn, lmdb and prometheus_client.
"""
