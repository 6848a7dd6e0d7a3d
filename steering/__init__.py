"""Steering: variant specifications (which tuning vectors, how strongly, where) and the merge methods that apply them."""

from tunevec.steering.merge import METHODS, merge_dare, merge_linear, merge_ties
from tunevec.steering.spec import SCOPES, Component, Spec

__all__ = ["METHODS", "SCOPES", "Component", "Spec", "merge_dare", "merge_linear", "merge_ties"]
