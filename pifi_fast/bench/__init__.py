"""Benchmarks of pifi_fast against the reference and the Hugging Face layer (docs/benchmarks.md).

    suite      run_benchmarks and run_breakdown: what `pifi-fast bench` / `breakdown` run
    workloads  the registry: all_cases() over the workload modules below
    w1_layer   W1, the frozen layer in full-sequence mode
    w2_cls     W2, the frozen layer in CLS mode
    w3_ops     W3, each op of the layer alone
    w4_step    W4, a whole PiFi train step / inference batch
    epoch      W4's whole SST-2 training epoch, through pifi_fast.train
    common     what the workloads share: Case, shapes, size lists, the implementations' layers
               and models
    timing     medians and spreads (CUDA events on GPU), measured ceilings, saved bytes
    report     table, JSON, Markdown, PNG plots, and --compare against an earlier run
    breakdown  where a training step's time goes (SLM, adapters, frozen layer, head, optimizer)

bench sits above the model and the training: it may import any pifi_fast module, and nothing in
the library imports bench except the CLI (so no module bench imports may import it back). Used by
`pifi-fast bench` / `pifi-fast breakdown` and by the pytest-benchmark suite in benchmarks/.
"""
