"""Geryon: a control plane for a small grid cluster (see README.md)."""

import os

# grpc's core would print its own multi-line account of, say, a failed bind
# next to the one line our programs say; GRPC_VERBOSITY=ERROR brings it back.
# Set before anything imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
