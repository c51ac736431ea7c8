"""The names pifi_fast.ops had before the frozen layer became the package pifi_fast.frozen,
kept for code that imports them from here. New code imports from pifi_fast.frozen's modules."""
from pifi_fast.frozen.custom_op import frozen_layer_op, register_layer  # noqa: F401
from pifi_fast.frozen.elementwise import (ACT_EPILOGUE, QK_NORMS, act_op,  # noqa: F401
                                          describe_kernels, elementwise_impl, impl_on,
                                          kernel_name, layer_kernels, norm_op)
from pifi_fast.frozen.function import (KEEP_ATTENTION_GRAPH, FrozenLayerFunction,  # noqa: F401
                                       LayerRun)
from pifi_fast.frozen.linear import (INT8_CPU_K_MULTIPLE, QuantWeight, fp8_linear,  # noqa: F401
                                     fp8_matmul_available, gemm_path, int8_cpu_applies,
                                     int8_cpu_linear)
from pifi_fast.frozen.options import (GEMM_CHOICES, KERNEL_CHOICES,  # noqa: F401
                                      RECOMPUTE_CHOICES, WEIGHT_CHOICES)
