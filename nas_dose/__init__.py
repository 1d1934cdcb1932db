"""nasdose: neural architecture search, ensembles and distillation for 3D dose prediction.

Pipeline: data -> search space -> strategy -> pool -> ensemble -> distil -> evaluate.
"""
import os

# NNI is only the search-space vocabulary here; without this it imports pytorch-lightning.
os.environ.setdefault("NNI_FRAMEWORK", "none")

__version__ = "0.1.0"
