"""pifi_fast.frozen: the frozen decoder layer, one module per concern. It imports the kernels
(pifi_fast.kernels), the compiled extension, attention and the family facts (pifi_fast.families),
never the model, loading, training or the CLI; the model imports it. Read from the bottom up:

    options     LayerOptions and its enums; the one reader of the layer's PIFI_FAST_* variables
    spec        LayerSpec (norm, block, activation, q/k/v layout) and one builder per family
    checkpoint  the checkpoint-key layout per family, and what GGUF conversion rewrites
    elementwise which Triton kernels or PyTorch twins run the elementwise steps, per device
    linear      dense and 8-bit projections (cuBLAS, Triton epilogues, W8A16, CPU int8, fp8)
    steps       the family's steps: norms, activation, q/k norms with RoPE, attention
    saved       Saved, what forward keeps for backward, and the custom op's view of it
    blocks      sequential / sandwich / parallel: forward -> (out, Saved), input_grad
    function    the autograd Function and LayerRun (per-call state)
    custom_op   the torch.library ops for torch.compile and the registry of live layers
    weights     the layer's tensors in the Hugging Face key layout, and their 8-bit storage
    module      FrozenLlamaLayer (= FrozenDecoderLayer), the nn.Module
    stack       FrozenLayerStack, several layers of one LLM
"""
