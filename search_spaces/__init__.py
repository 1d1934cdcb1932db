"""Search spaces for 3D dose prediction: candidate ops, the LENAS cell, spaces, genotypes, supernet.

Spaces: ``lenas`` (the published space, 75,000 architectures) and ``lenas_levels`` (a cell
design per level, extended ops, width and depth slots). A genotype (YAML) names a space, its
version, one value per slot and the macro; ``build_model(g)`` returns a plain ``torch.nn``
network and ``Supernet(space)`` the differentiable supernet over the same cells.

Adding an op (one file, one registration)::

    from nas_dose.search_spaces import register_op

    @register_op("conv_k7", "cell")            # kind: cell | connect | down | up (or a tuple)
    def conv_k7(c_in, c_out):                  # down ops map n -> ceil(n/2);
        ...                                    # up ops have forward(x, size) to an exact size

Adding a space (one file): subclass ``SearchSpace``, define ``slots()`` (slot -> ordered
candidates), ``default_macro()`` and ``construct(choices, macro, make)`` (build the network,
asking ``make(slot, kind, c_in, c_out)`` for each op slot; ``cells.CellUNet`` does this for a
U-Net of LENAS cells), and decorate it with ``@register_space("name")``.

From outside the package: ``import_plugins(["mypkg.ops"])`` imports modules that register ops
or spaces, and ``get_space("mypkg.spaces:MySpace")`` loads a
space class by import path (unregistered, it is named by that path in its genotypes).
"""
from . import lenas, lenas_levels  # noqa: F401  (registers the built-in spaces)
from .cells import Cell, CellUNet, cell_slots
from .genotype import Genotype, save_genotype
from .measure import count_flops, count_params, forward_latency
from .ops import OpSpec, get_op, list_ops, make_op, register_op
from .space import (
                    SearchSpace,
                    build_model,
                    genotype_from_dict,
                    get_space,
                    import_plugins,
                    list_spaces,
                    load_genotype,
                    register_space,
)
from .supernet import MixedOp, Supernet

__all__ = [
    "Cell", "CellUNet", "cell_slots", "Genotype", "genotype_from_dict", "load_genotype", "save_genotype", "count_flops",
    "count_params", "forward_latency", "OpSpec", "get_op", "list_ops", "make_op", "register_op", "SearchSpace",
    "build_model", "get_space", "import_plugins", "list_spaces", "register_space", "MixedOp", "Supernet",
]
