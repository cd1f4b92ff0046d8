"""Crash injection, fault injection, corruption and input fuzzing for ckptstore.

``python -m fuzz crash|power|errors|corrupt|parsers|malicious|all --budget SECONDS``
runs one family (or all) and prints and writes JSON counts; ``failures`` must be 0.
docs/reliability.md describes each family and the oracle it checks against.
"""
