"""pifi_fast: fast PiFi (a frozen LLM decoder layer inside a small LM).

    from pifi_fast import PiFiModel
    model = PiFiModel.from_parts("bert-base-uncased", "meta-llama/Llama-3.1-8B", layer=-1,
                                 task="classification", num_labels=2)

Data flows one way: kernels -> ops -> layer -> model -> cli. pifi_fast.reference holds the same
model built only from Hugging Face modules, the yardstick for every fast path.
"""
from pifi_fast._ext import HAS_EXTENSION, frozen_linear
from pifi_fast.layer import FrozenLlamaLayer
from pifi_fast.loading import LLMLayer, load_llm_layer
from pifi_fast.model import PiFiModel

__all__ = ["PiFiModel", "FrozenLlamaLayer", "LLMLayer", "load_llm_layer", "frozen_linear",
           "HAS_EXTENSION"]

def _installed_version() -> str:
    """The installed distribution's version: a build with the compiled extension names the torch
    it was compiled against (0.1.0+torch2.14cu130)."""
    from importlib import metadata

    try:
        return metadata.version("pifi-fast")
    except metadata.PackageNotFoundError:
        return "0.1.0"


__version__ = _installed_version()
