"""Evaluation: scoring of generated and trained networks, and the report that cannot be fooled."""
