"""Elastic (MatFormer) submodels: training policies, Mix'n'Match extraction, Pareto sweep.

Only the policy is imported here: braid.train.config imports it, and extraction and the
sweep import braid.train (import them from braid.elastic.extract / braid.elastic.sweep).
"""

from braid.elastic.policy import POLICIES, ElasticConfig, ElasticPolicy, build_policy

__all__ = ["POLICIES", "ElasticConfig", "ElasticPolicy", "build_policy"]
