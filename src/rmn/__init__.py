"""rmn: Routing-by-Memory Networks (Zhang et al., "Neural Routing by Memory", NeurIPS 2021)."""
from . import precision  # noqa: F401  (first: sizes oneDNN's kernel cache before any convolution runs)
from .attention import ConditionalAttention
from .backbones import Backbone, create_backbone, list_backbones, register_backbone
from .dispatch import dispatch
from .features import MemoryInit, init_memories
from .fused import fuse_for_inference
from .kmeans import KMeansResult, kmeans
from .memory import MemoryBank
from .pooled_bn import set_procedure_batchnorm
from .route import Routing, last_routes, route, routed_stages, set_auto_update, update_memories
from .stage import RoutedStage
from .training import clone_optimizer

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "ConditionalAttention",
    "MemoryBank",
    "RoutedStage",
    "Routing",
    "clone_optimizer",
    "create_backbone",
    "dispatch",
    "fuse_for_inference",
    "KMeansResult",
    "MemoryInit",
    "init_memories",
    "kmeans",
    "last_routes",
    "list_backbones",
    "register_backbone",
    "route",
    "routed_stages",
    "set_auto_update",
    "set_procedure_batchnorm",
    "update_memories",
]
