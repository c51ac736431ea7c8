"""Training PiFi: one module per concern of a fine-tuning run.

    config       TrainConfig, and its names resolved (SLM, LLM, tokenizer, baseline, the model)
    runtime      device precision, distributed processes, random state, batches to the device
    batches      a split's rows loaded for a task; TaskData turns them into padded batches
    optim        Adam (fused where torch has it), clipping, the non-finite guard
    faults       PIFI_FAST_FAULT fault injection for the reliability tests
    checkpoints  writing, loading and recovering a run's checkpoints
    evaluation   per-task metrics (QA answer decoding, BLEU), and of a saved checkpoint
    sharding     --distributed fsdp: FSDP2 units, the frozen layer replicated, full checkpoints
    loop         train(cfg): the loop that ties them together
    select_layer pifi-fast select-layer / train --layer auto: layers ranked by a cheap proxy
    sweep        pifi-fast sweep: a grid of train runs, resumable cell by cell, and its report

Imports run one way: sweep -> loop -> select_layer / evaluation / checkpoints / optim / sharding ->
batches / config / runtime -> the model, data and metrics modules below. Nothing under pifi_fast.model, layer, ops or kernels
imports training; the CLI, the demo and the benchmarks do. pifi_fast.train re-exports the
public names (TrainConfig, train, evaluate_checkpoint, ...).
"""
