"""Steering: variant specifications (which tuning vectors, how strongly, where) and the merge methods that apply them.

The package itself imports nothing, so ``import tunevec.steering.spec`` (what a server does to read a request)
does not load torch. Import what you need from its modules:

- ``tunevec.steering.spec``: ``Spec``, ``Component``, ``SCOPES`` and the parsing limits (no torch);
- ``tunevec.steering.merge``: the merge methods and their registry ``METHODS`` (torch only when a merge runs);
- ``tunevec.steering.delta``: ``delta_for``, a spec applied to one checkpoint tensor;
- ``tunevec.steering.inject``: full-rank injection into a checkpoint stream (``merge_to_checkpoint``).
"""
