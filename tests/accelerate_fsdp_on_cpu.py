"""Run a script under `accelerate launch` with Accelerate's FSDP plugin switched on for CPU
processes, as Accelerate switches it on for GPU ones (tests only).

Accelerate 1.16 makes a multi-process state FSDP only for accelerator devices (AcceleratorState:
the ACCELERATE_USE_FSDP check sits in the branch for MULTI_GPU, MULTI_XPU, ...), so on the CPU
an FSDP config runs as DDP. tests/test_fsdp.py uses this wrapper to check PiFiTrainer's FSDP2
path with two gloo processes: it applies the plugin the launcher passed, nothing else.

    accelerate launch --config_file CONFIG tests/accelerate_fsdp_on_cpu.py SCRIPT ARGS...
"""
import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
