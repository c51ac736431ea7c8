"""Triton kernels of pifi_fast, installed as ``pifi_fast.kernels``.

NOT YET BUILT: the fused RMSNorm, RoPE, SwiGLU and projection kernels are the work of the
fused-layer issue. Until then FrozenLlamaLayer runs its plain PyTorch path (pifi_fast.ops),
and this package deliberately exports nothing.
"""

__all__: list[str] = []
