"""Convert the stacked blocks of any CNN into reused blocks: a ``torch.fx`` pass.

A network built from stages of identical blocks (ResNet's ``layerN``, the stages of EfficientNet,
ConvNeXt, RegNet, ...) spends most of its parameters on blocks that all have the same shape.
:func:`convert` finds each *run* of such blocks and replaces it by one :class:`~reuse.LayerReuse`:
the first block's weights (or the run's mean) applied ``k`` times, each use with its own BatchNorm,
copied from the block it replaces, and the paper's channel shuffle between uses.

How a run is found:

1. Modules that have a sibling of the same *structure* are candidate blocks: same classes module by
   module, same hyperparameters (the non-tensor settings in each module's ``__dict__`` and its
   ``extra_repr``), same parameter and buffer shapes. Submodules without weights may differ in their
   settings (drop-path rates), and ``nn.Identity`` counts as a drop-path of rate 0: such modules are
   kept one per use, like BatchNorm.
2. The model is traced with ``torch.fx``, candidate blocks kept as leaves, so a run shows as a chain
   of calls ``blocks.1 -> blocks.2 -> ...`` whatever the container (``nn.Sequential``, a
   ``ModuleList`` looped over in ``forward``, timm stages).
3. A run is two or more blocks called in a row, each one's only input the previous one's output (which
   nothing else reads), whose output shape equals their input shape on an example input. A block is
   one module, or a few consecutive sibling modules whose structures repeat (VGG's conv, BN, ReLU;
   Swin's alternating blocks). Shapes come from one forward pass on the ``meta`` device: no arithmetic.

Where the blocks sit in an ``nn.Sequential``, the run is swapped in place and the model keeps its
class; elsewhere (a ``ModuleList`` looped over in a custom ``forward``) the module whose ``forward``
calls the blocks is replaced by a ``torch.fx.GraphModule`` of its traced ``forward``.
"""

from reuse.fx.api import convert, find_runs
from reuse.fx.report import ConversionReport, Run

__all__ = ["ConversionReport", "Run", "convert", "find_runs"]
