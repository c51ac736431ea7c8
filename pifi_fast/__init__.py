"""pifi_fast: fast PiFi (a frozen LLM decoder layer inside a small LM).

    from pifi_fast import PiFiModel
    model = PiFiModel.from_parts("bert-base-uncased", "meta-llama/Llama-3.1-8B", layer=-1,
                                 task="classification", num_labels=2)

Data flows one way: kernels -> frozen -> model -> training -> cli (docs/layout.md says which
module owns what). pifi_fast.reference holds the same model built only from Hugging Face
modules, the yardstick for every fast path. The names below are exported lazily (a module
__getattr__): importing pifi_fast.kernels or pifi_fast.frozen runs this file, and loads neither
the model nor training until one of these names is asked for.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pifi_fast.version import installed_version

if TYPE_CHECKING:  # where the lazy names live, for type checkers and the API pages (griffe)
    from pifi_fast._ext import HAS_EXTENSION, frozen_linear
    from pifi_fast.frozen.module import FrozenDecoderLayer, FrozenLlamaLayer
    from pifi_fast.loading import LLMLayer, load_llm_layer
    from pifi_fast.model import PiFiModel

# name -> the module that defines it
_EXPORTS = {"PiFiModel": "pifi_fast.model", "FrozenLlamaLayer": "pifi_fast.frozen.module",
            "FrozenDecoderLayer": "pifi_fast.frozen.module", "LLMLayer": "pifi_fast.loading",
            "load_llm_layer": "pifi_fast.loading", "frozen_linear": "pifi_fast._ext",
            "HAS_EXTENSION": "pifi_fast._ext"}

__all__ = ["PiFiModel", "FrozenLlamaLayer", "FrozenDecoderLayer", "LLMLayer", "load_llm_layer",
           "frozen_linear", "HAS_EXTENSION"]

__version__ = installed_version()


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # found once; later lookups skip this function
        return value
    raise AttributeError(f"module 'pifi_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
