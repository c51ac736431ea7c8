"""Per-call time of the fused layer on a tiny input (1 sentence of 1 token, hidden 64): the
Python work around the kernels, which the W2 CLS case at 1 row is most exposed to."""
import statistics, sys, time
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from pifi_fast.layer import FrozenLlamaLayer

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=1)
hf = LlamaDecoderLayer(cfg, 0)
layer = FrozenLlamaLayer.from_hf(hf, cfg, LlamaRotaryEmbedding(cfg))
x = torch.randn(1, 1, 64, requires_grad=True)
mask = torch.ones(1, 1, dtype=torch.long)

def step():
    y = layer(x, attention_mask=mask)
    y = y[0] if isinstance(y, tuple) else y
    y.sum().backward()

for _ in range(200):
    step()
blocks = []
for _ in range(15):
    t = time.perf_counter()
    for _ in range(200):
        step()
    blocks.append((time.perf_counter() - t) / 200 * 1e6)
print(f"{sys.argv[1]} us/call median {statistics.median(blocks):.1f} min {min(blocks):.1f} max {max(blocks):.1f}")
