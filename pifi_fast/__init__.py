"""pifi_fast: fast PiFi (a frozen LLM decoder layer inside a small LM).

    from pifi_fast import PiFiModel
    model = PiFiModel.from_parts("bert-base-uncased", "meta-llama/Llama-3.1-8B", layer=-1,
                                 task="classification", num_labels=2)

Data flows one way: kernels -> ops -> layer -> model -> training -> cli (docs/layout.md says
which module owns what). pifi_fast.reference holds the same model built only from Hugging Face
modules, the yardstick for every fast path. This package's top imports the model and its
parts only: training, the CLI and the benchmarks are imported by whoever uses them.
"""
from pifi_fast._ext import HAS_EXTENSION, frozen_linear
from pifi_fast.layer import FrozenLlamaLayer
from pifi_fast.loading import LLMLayer, load_llm_layer
from pifi_fast.model import PiFiModel
from pifi_fast.version import installed_version

__all__ = ["PiFiModel", "FrozenLlamaLayer", "LLMLayer", "load_llm_layer", "frozen_linear",
           "HAS_EXTENSION"]

__version__ = installed_version()
