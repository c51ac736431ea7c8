"""PiFiModel under Hugging Face's `transformers.Trainer`.

A PiFiModel is an nn.Module, not a PreTrainedModel, so a plain Trainer saves its checkpoints as
a bare state dict (and safetensors refuses the merged layer's shared views). PiFiTrainer saves
every checkpoint, and the final model, through PiFiModel.save_pretrained: each checkpoint-N
folder then loads with PiFiModel.from_pretrained, and trainer.train(resume_from_checkpoint=...)
continues a run (the Trainer loads model.safetensors back through load_state_dict).
"""
from __future__ import annotations

from pathlib import Path

from transformers import Trainer

from pifi_fast.pifi_base import PiFiBase


class PiFiTrainer(Trainer):
    """transformers.Trainer whose checkpoints are PiFi checkpoints (see the module docstring)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PiFiBase):  # any other model: the Trainer's own way
            return super()._save(str(output_dir), state_dict)
        if self.args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(output_dir, into_existing=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir / "tokenizer")
