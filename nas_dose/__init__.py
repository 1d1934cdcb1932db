"""nasdose: neural architecture search, ensembles and distillation for 3D dose prediction.

Pipeline: data -> search space -> strategy -> pool -> ensemble -> distil -> evaluate.

The Python API (nas_dose.api): `nas_dose.load(model).predict(patient)`, `nas_dose.read_patient`,
`nas_dose.score` (not `scores`: that is the module nas_dose.scores).
"""
import os
from typing import Any

# NNI is only the search-space vocabulary here; without this it imports pytorch-lightning.
os.environ.setdefault("NNI_FRAMEWORK", "none")

__version__ = "0.1.0"

API = ("load", "read_patient", "score", "DosePredictor")


def __getattr__(name: str) -> Any:
    """`nas_dose.load` and the rest of the API, imported on first use (PEP 562)."""
    if name in API:
        # here, not at the top: `import nas_dose` (the command line, the configs, data tools)
        # must not load torch and every layer of the package; the API sits at the stages' layer
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
