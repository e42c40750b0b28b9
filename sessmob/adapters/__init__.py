"""Adapters behind interface A: application, transport (TCP, UDP) and network (address)."""
