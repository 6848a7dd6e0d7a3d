"""The ground floor: errors, module roles, the checkpoint reader, the tuning-vector artifact and the linear algebra.

Nothing here imports from the rest of tunevec; every other layer builds on it (docs/architecture.md).
"""
