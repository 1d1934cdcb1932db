"""The pool: scored candidates, how diverse they are, the pool file and its figures.

It sits below both the search strategies (which fill a pool) and the ensemble (which trains and
selects from one), so neither reaches into the other.
"""
from .candidate import Candidate
from .diversity import (
                        MATRICES,
                        DiversityConfig,
                        diversity_hinge,
                        diversity_key,
                        error_correlation,
                        pairwise_matrices,
                        prediction_disagreement,
                        select_pool,
)
from .file import Pool, PoolMember, load_pool, save_pool

__all__ = ["Candidate", "MATRICES", "DiversityConfig", "diversity_hinge", "diversity_key", "error_correlation",
           "pairwise_matrices", "prediction_disagreement", "select_pool", "Pool", "PoolMember", "load_pool",
           "save_pool"]
