"""The names pifi_fast.layer had before the frozen layer became the package pifi_fast.frozen,
kept for code (and pickles) that import them from here."""
from pifi_fast.frozen.checkpoint import falcon_qkv_rows, key_layout  # noqa: F401
from pifi_fast.frozen.module import (CPU_CHUNK_BYTES, FrozenDecoderLayer,  # noqa: F401
                                     FrozenLlamaLayer)
from pifi_fast.frozen.stack import FrozenLayerStack  # noqa: F401
from pifi_fast.frozen.weights import PER_CHANNEL, PROJECTIONS, STORAGE  # noqa: F401
