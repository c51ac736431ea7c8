"""PiFiModel under Hugging Face's `transformers.Trainer`.

A PiFiModel is an nn.Module, not a PreTrainedModel, so a plain Trainer saves its checkpoints as
a bare state dict (and safetensors refuses the merged layer's shared views). PiFiTrainer saves
every checkpoint, and the final model, through PiFiModel.save_pretrained: each checkpoint-N
folder then loads with PiFiModel.from_pretrained, and trainer.train(resume_from_checkpoint=...)
continues a run (the Trainer loads model.safetensors back through load_state_dict).

Under Accelerate's FSDP version 2 plugin (docs/examples/accelerate_fsdp2.yaml) the Trainer's
own FSDP saving and loading go through torch.distributed.checkpoint's helpers, which find a
state-dict key by walking attributes; the fused frozen layer names its tensors as Transformers
does (self_attn.q_proj.weight), not by its attributes, so PiFiTrainer gathers and scatters the
weights and the optimizer state itself (pifi_fast.training.sharding): every rank gathers, the
main process writes the same PiFi checkpoint as without FSDP, plus optimizer.pt (the full
optimizer state keyed by parameter name) and the scheduler, and resuming scatters them back.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer

from pifi_fast.pifi_base import PiFiBase
from pifi_fast.training import sharding
from pifi_fast.training.checkpoints import load_weights

OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"  # the Trainer's names


class PiFiTrainer(Trainer):
    """transformers.Trainer whose checkpoints are PiFi checkpoints (see the module docstring)."""

    def _pifi_fsdp(self) -> bool:
        """Whether this is a PiFi model under Accelerate's FSDP version 2 (sharded weights)."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return (plugin is not None and getattr(plugin, "fsdp_version", 1) == 2
                and isinstance(self.accelerator.unwrap_model(self.model), PiFiBase))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._pifi_fsdp():
            return super().save_model(output_dir, _internal_call)
        state = sharding.full_model_state(self.model)  # every rank gathers
        self._save(output_dir, state_dict=state)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PiFiBase):  # any other model: the Trainer's own way
            return super()._save(str(output_dir), state_dict)
        if self.args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            # a sharded model's weights come gathered; otherwise the model's own state dict
            model.save_pretrained(output_dir, into_existing=True,
                                  state_dict=state_dict if self._pifi_fsdp() else None)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir / "tokenizer")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._pifi_fsdp():
            return super()._save_optimizer_and_scheduler(output_dir)
        state = sharding.full_optimizer_state(self.model, self.optimizer)  # every rank
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_FILE))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._pifi_fsdp():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # every rank reads the full weights and keeps its shard (a lean checkpoint's frozen
        # layer is the model's own, checked against the recorded sha256)
        load_weights(self.accelerator.unwrap_model(self.model), Path(resume_from_checkpoint),
                     "cpu", load_state=lambda sd, strict: sharding.load_full_model_state(
                         self.model, sd, strict))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._pifi_fsdp():
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer = torch.load(os.path.join(checkpoint, OPTIMIZER_FILE), map_location="cpu",
                               weights_only=True)
        sharding.load_full_optimizer_state(self.model, self.optimizer, optimizer)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_FILE),
                                                     weights_only=True))
