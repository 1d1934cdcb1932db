"""Search strategies, diversity measures, the pool file and `nasdose search`.

Strategies register themselves by name (`register_strategy`); the built-in ones are imported on
first use by `get_strategy`, so importing this package loads neither NNI nor any search code.
"""
from .base import Candidate, SearchContext, Strategy, get_strategy, list_strategies, register_strategy
from .diversity import (DiversityConfig, diversity_hinge, error_correlation, pairwise_matrices,
                        prediction_disagreement, select_pool)
from .pool import Pool, PoolMember, load_pool, save_pool

__all__ = ["Candidate", "SearchContext", "Strategy", "get_strategy", "list_strategies", "register_strategy",
           "DiversityConfig", "diversity_hinge", "error_correlation", "pairwise_matrices",
           "prediction_disagreement", "select_pool", "Pool", "PoolMember", "load_pool", "save_pool"]
