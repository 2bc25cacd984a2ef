"""Geryon's benchmark: ``make bench`` runs ``python -m bench.run``; see README.md."""
