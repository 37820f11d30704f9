"""Analysis of RMN models: cost tables, routing statistics, latency, the memory atlas.

* :mod:`.cost` -- ``count_params``, ``macs_per_image`` (FlopCounterMode on the executed path), ``cost_table``
* :mod:`.routing` -- ``load_stats``, ``network_load_stats``, ``class_memory_counts``, ``purity``...
* :mod:`.features` -- ``stage_inputs`` (GAP'd input of every stage), ``collect_stage_features``
* :mod:`.atlas` -- ``draw_atlas``, ``memory_atlas``, ``nearest_images`` (imports matplotlib/Pillow on use)
* :mod:`.latency`, :mod:`.dispatch_bench` -- interleaved CPU/CUDA timing benchmarks
* :mod:`.calibrate` -- memories from a batch (k-means, or given route shares) for benchmarks
* the ``rmn summary``, ``rmn bench`` and ``rmn atlas`` commands are in :mod:`rmn.cli`
"""
from .cost import cost_table, count_params, format_table, macs_per_image
from .features import collect_stage_features, stage_inputs
from .routing import (class_memory_counts, load_stats, mean_purity, network_load_stats, purity, route_stats,
                      routing_report)


def __getattr__(name):  # lazy: keep `import rmn.analysis` free of matplotlib
    if name in ("draw_atlas", "memory_atlas", "nearest_images"):
        from . import atlas

        return getattr(atlas, name)
    raise AttributeError(name)


__all__ = [
    "class_memory_counts", "collect_stage_features", "cost_table", "count_params", "draw_atlas", "format_table",
    "load_stats", "macs_per_image", "mean_purity", "memory_atlas", "nearest_images", "network_load_stats",
    "purity", "route_stats", "routing_report", "stage_inputs",
]
