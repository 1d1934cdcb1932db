"""Search strategies and `nasdose search`.

Strategies register themselves by name (`register_strategy`); the built-in ones are imported on
first use by `get_strategy`, so importing this package loads neither NNI nor any search code.
What a search produces (candidates, diversity, the pool file) is `nas_dose.pool`.
"""
from .base import SearchContext, Strategy, get_strategy, list_strategies, register_strategy

__all__ = ["SearchContext", "Strategy", "get_strategy", "list_strategies", "register_strategy"]
