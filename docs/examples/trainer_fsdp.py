"""PiFiTrainer (transformers.Trainer with PiFi checkpoints) under `accelerate launch` with the
FSDP version 2 plugin: a few steps on a handful of sentences with the offline MiniLM and
SmolLM2's last layer, a checkpoint every 2 steps, then (with --resume) on from the last one.

    accelerate launch --config_file docs/examples/accelerate_fsdp2.yaml \\
        docs/examples/trainer_fsdp.py --output-dir runs/trainer-fsdp

Every checkpoint-N folder is a PiFi checkpoint: PiFiModel.from_pretrained loads it in one
process, without Accelerate.

On GPUs the model is sharded with FSDP2. On the CPU, Accelerate (1.16) turns its FSDP plugin on
only for accelerator devices: the same command then runs as DDP over gloo, and says so.
"""
import argparse

import torch

from torch.distributed.fsdp import FSDPModule
from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from pifi_fast import PiFiModel
from pifi_fast.train import resolve_llm, resolve_slm
from pifi_fast.trainer import PiFiTrainer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slm", default="minilm", help="Hub id or folder (minilm: the offline one)")
    p.add_argument("--llm", default="smollm2", help="Hub id, folder or .gguf (smollm2: offline)")
    p.add_argument("--output-dir", default="runs/trainer-fsdp")
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = p.parse_args()

    slm = resolve_slm(args.slm)
    tok = AutoTokenizer.from_pretrained(slm)
    model = PiFiModel.from_parts(slm, resolve_llm(args.llm), num_labels=2, seed=0,
                                 packed_slm=False)  # the SLM's own forward: FSDP gathers there
    texts = ["a gripping, warm film", "dull and far too long", "a fine cast", "a poor plot"] * 4
    rows = [dict(tok(t), labels=i % 2) for i, t in enumerate(texts)]
    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps,
                                 per_device_train_batch_size=4, learning_rate=1e-4,
                                 save_strategy="steps", save_steps=2, report_to=[], seed=0,
                                 lr_scheduler_type="constant", logging_steps=1,
                                 use_cpu=not torch.cuda.is_available())
    trainer = PiFiTrainer(model=model, args=training, train_dataset=rows, processing_class=tok,
                          data_collator=DataCollatorWithPadding(tok))
    out = trainer.train(resume_from_checkpoint=True if args.resume else None)
    if trainer.is_world_process_zero():
        sharded = isinstance(trainer.model_wrapped, FSDPModule)
        print(f"{training.world_size} processes, the model "
              + ("sharded with FSDP2" if sharded else "replicated (not FSDP)"))
        print(f"{out.global_step} steps, training loss {out.training_loss:.4f}; "
              f"checkpoints in {args.output_dir}")


if __name__ == "__main__":
    main()
