"""Foreign engines, one module each, behind small predicates: the rest of vr_plugin never names their classes,
private attributes or version switches.

* :mod:`.bitsandbytes` -- quantized linear maps and parameters, logical shapes, quantization-state keys;
* :mod:`.deepspeed` -- ZeRO-3 partitioned parameters, gathering, logical sizes, the optimizer's parameter groups;
* :mod:`.fsdp` -- accelerate's active FSDP plugin, flat parameters without their originals;
* :mod:`.processes` -- which process of a distributed run is the main one.

Each imports its engine lazily, so none is required to import vr_plugin.
"""
