"""What the reference PiFi and pifi_fast.PiFiModel share: the SLM, the two adapters, the task
heads, input checks, and saving/loading. Only the frozen LLM layer differs between the two
(`_make_layer` / `_run_layer`), so a checkpoint of one loads into the other.

    h_enc = SLM_encoder(x);  h = L_out(LLM_layer(L_in(h_enc)));  y = Head(h)

Tasks (GUIDE §1):
  classification      [CLS] only, as a length-1 sequence at position 0; head
                      Linear(d,d) -> Dropout(0.2) -> GELU -> Linear(d,C); sentence pairs too
  question_answering  whole sequence, bidirectional; start/end logits
  token_classification whole sequence; one label per token
  seq2seq             T5/BART: the layer sits between encoder and decoder
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import (
    BaseModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from pifi_fast.loading import (CheckpointError, LLMLayer, build_layer, load_llm_layer,
                               random_layer, resolve_index)

TASKS = ("classification", "question_answering", "token_classification", "seq2seq")
_TASK_ALIASES = {"sequence_classification": "classification", "pair_classification":
                 "classification", "nli": "classification", "qa": "question_answering",
                 "ner": "token_classification", "translation": "seq2seq",
                 "summarization": "seq2seq"}
CONFIG_NAME = "pifi_config.json"
WEIGHTS_NAME = "model.safetensors"


def _hidden(config) -> int:
    return getattr(config, "hidden_size", None) or config.d_model


def _load_slm(slm, task: str):
    """SLM from a Hub id / folder, a config (random init) or a ready module."""
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, PretrainedConfig

    if isinstance(slm, nn.Module):
        return slm
    seq2seq = task == "seq2seq"
    if isinstance(slm, PretrainedConfig):
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModel
        return cls.from_config(slm)
    config = AutoConfig.from_pretrained(slm, trust_remote_code=False)
    if seq2seq != bool(getattr(config, "is_encoder_decoder", False)):
        raise ValueError(f"task {task!r} needs {'an encoder-decoder' if seq2seq else 'an encoder'}"
                         f" SLM, but {slm} is model_type {config.model_type!r}")
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModel
    return cls.from_pretrained(slm, trust_remote_code=False, use_safetensors=True)


def _slm_tokenizer(slm):
    """The tokenizer of an SLM given by Hub id or folder, or None where it has none (or it
    cannot be read here); predict() then asks for one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(slm)
    except (OSError, ValueError, ImportError):  # no tokenizer files, unreadable, or a missing
        return None                              # optional package (sentencepiece)


ADAPTERS = ("linear", "mlp")


def make_adapter(kind: str, d_in: int, d_out: int, width: int) -> nn.Module:
    """L_in / L_out. "linear": the paper's Linear(d_in, d_out) without bias (state-dict key
    adapter_*.weight, as the authors'). "mlp": Linear(d_in, width) -> GELU -> Linear(width,
    d_out), the richer adaptation network the paper's limitations section suggests. No norm and
    no residual: the LLM layer opens with its own RMSNorm (a norm in L_in would be undone by
    it), and the two sides have different widths, so a residual would need a linear map anyway,
    which is the linear adapter again."""
    if kind == "linear":
        return nn.Linear(d_in, d_out, bias=False)
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, d_out))


def _decoder_only(config) -> bool:
    """A causal decoder (Llama, Qwen, GPT-2, ...): a causal-LM architecture and no masked-LM
    one (BERT-like encoders have both), not an encoder-decoder."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", None)
    return (not getattr(config, "is_encoder_decoder", False)
            and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _layer_list(llm) -> list:
    """[] for no LLM, else the LLM layers as a list (one LLMLayer or several of one LLM)."""
    if llm is None:
        return []
    llms = list(llm) if isinstance(llm, (list, tuple)) else [llm]
    if not llms:
        raise ValueError("llm: an empty list of layers")
    first = llms[0].config
    for one in llms[1:]:
        if (one.config.model_type, one.config.hidden_size) != (first.model_type,
                                                               first.hidden_size):
            raise ValueError("several plugged layers must come from one LLM: got "
                             f"{first.model_type}/{first.hidden_size} and "
                             f"{one.config.model_type}/{one.config.hidden_size}")
    return llms


def _check_adapter(adapter, width, llm):
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if width is not None and (adapter != "mlp" or isinstance(width, bool)
                              or not isinstance(width, int) or width < 1):
        raise ValueError(f"adapter_width must be a positive int and needs adapter='mlp', got "
                         f"{width!r} with adapter={adapter!r}")
    if adapter != "linear" and llm is None:
        raise ValueError(f"adapter={adapter!r} needs an LLM layer (llm=None is the SLM alone, "
                         "which has no adapters)")


class PiFiBase(nn.Module):
    """PiFi around any SLM; subclasses choose how the frozen LLM layer is run."""

    def __init__(self, slm: nn.Module, llm: LLMLayer | list[LLMLayer] | None,
                 task: str = "classification",
                 num_labels: int = 2, label_smoothing: float = 0.0, head_dropout: float = 0.2,
                 attend_to_padding: bool = False, freeze: bool = True,
                 validate_inputs: bool | None = None, labels: list | None = None,
                 lora: dict | None = None, adapter: str = "linear",
                 adapter_width: int | None = None, **layer_options):
        super().__init__()
        # Token ids and labels are range-checked in forward when the inputs are on the CPU (free)
        # or when validate_inputs=True (on a GPU the check costs a device sync): a bad id on a
        # GPU is a device-side assert that poisons every later CUDA call of the process.
        self.validate_inputs = validate_inputs
        # The label vocabulary (class index -> label as the data spells it), saved with the
        # weights so evaluation and prediction map labels the same way; None when unknown.
        self.labels = list(labels) if labels is not None else None
        task = _TASK_ALIASES.get(task, task)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        self.task = task
        self.num_labels = num_labels
        self.label_smoothing = label_smoothing
        self.attend_to_padding = attend_to_padding
        self.freeze = freeze
        self.slm = slm
        # PiFi reads last_hidden_state only: a pooler (BERT and kin) never gets a gradient.
        # Freezing it says so, and keeps DDP from waiting for gradients that never come.
        pooler = getattr(slm, "pooler", None)
        if isinstance(pooler, nn.Module):
            for p in pooler.parameters():
                p.requires_grad_(False)
        d_slm = _hidden(slm.config)
        # the sentence vector for classification: [CLS] (the first token) for encoders; the
        # last real token for a decoder-only SLM, whose first token sees only itself
        self.pooling = "last" if _decoder_only(slm.config) else "first"
        if lora:
            # LoRA on the SLM (peft): its own weights frozen, low-rank updates trained; the
            # adapters around the LLM layer and the head stay fully trained
            slm = self.slm = _with_lora(slm, lora)
        # llm=None is the SLM alone with the same head: the baseline PiFi is compared with.
        # A list: several layers of one LLM, run in the order given (llm_index is then a list).
        llms = _layer_list(llm)
        self.llm_config = llms[0].config if llms else None
        self.llm_index = (None if not llms else llms[0].index if len(llms) == 1
                          else [one.index for one in llms])
        # where the frozen layer came from (a folder, Hub id or .gguf): lean checkpoints store
        # this reference instead of the layer's tensors
        self.llm_source = getattr(llms[0], "source", None) if llms else None
        _check_adapter(adapter, adapter_width, llm)
        if llms:
            d_llm = self.llm_config.hidden_size
            self.adapter_in = make_adapter(adapter, d_slm, d_llm, adapter_width or d_slm)
            self.adapter_out = make_adapter(adapter, d_llm, d_slm, adapter_width or d_slm)
            self._make_layer(llms, freeze=freeze, **layer_options)
        if task == "classification":
            self.head = nn.Sequential(nn.Linear(d_slm, d_slm), nn.Dropout(head_dropout), nn.GELU(),
                                      nn.Linear(d_slm, num_labels))
        elif task == "question_answering":
            self.head = nn.Linear(d_slm, 2)
        elif task == "token_classification":
            self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(d_slm, num_labels))
        self._options = dict(task=task, num_labels=num_labels, label_smoothing=label_smoothing,
                             head_dropout=head_dropout, attend_to_padding=attend_to_padding,
                             freeze=freeze, **({"lora": dict(lora)} if lora else {}),
                             **({"adapter": adapter, "adapter_width": adapter_width or d_slm}
                                if adapter != "linear" else {}),
                             **layer_options)

    # -- hooks for the subclasses ---------------------------------------------------------------
    def _make_layer(self, llms: list[LLMLayer], freeze: bool, **layer_options):
        """Set self.llm_layer: the one layer, or a module running several in order."""
        raise NotImplementedError

    def _run_layer(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """h (B, S, d_llm) in the layer's dtype; mask (B, S) of real tokens or None."""
        raise NotImplementedError

    @property
    def layer_dtype(self) -> torch.dtype:
        return next(self.llm_layer.parameters()).dtype

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, slm, llm, layer: int | list[int] = -1, task: str = "classification",
                   *, layers: list[int] | None = None, llm_dtype: torch.dtype | None = None,
                   allow_pickle: bool = False, seed: int | None = None, **task_options):
        """slm: Hub id, folder, config or module; llm: Hub id, folder, .gguf file, LLMLayer, or a
        PretrainedConfig (random weights, for tests and speed benchmarks). ``layer``: the
        decoder layer's index (negative counts from the end); ``layers`` (or a list as
        ``layer``): several layers, read alone from the source and run in the order given."""
        from transformers import PretrainedConfig

        if layers is not None and layer != -1:
            raise ValueError("pass layer or layers, not both")
        indices = list(layers if layers is not None else
                       layer if isinstance(layer, (list, tuple, range)) else [layer])
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool)
                                  for i in indices):
            raise ValueError(f"layers must be one or more int indices, got {indices!r}")
        if seed is not None:
            torch.manual_seed(seed)
        slm_module = _load_slm(slm, _TASK_ALIASES.get(task, task))
        if llm is None:
            llm_layers = None
        elif isinstance(llm, (LLMLayer, list)):
            llm_layers = llm
        elif isinstance(llm, PretrainedConfig):
            # in a stack each random layer is seeded by its index (seed + index), so a stack is
            # not one layer repeated and its order matters; one layer keeps ``seed`` itself
            llm_layers = [random_layer(llm, i, dtype=llm_dtype or torch.float32,
                                       seed=None if seed is None else seed if len(indices) == 1
                                       else seed + resolve_index(llm, i))
                          for i in indices]
        else:
            llm_layers = [load_llm_layer(llm, i, dtype=llm_dtype, allow_pickle=allow_pickle)
                          for i in indices]
        if isinstance(llm_layers, list):
            found = [one.index for one in llm_layers]
            if len(set(found)) != len(found):
                raise ValueError(f"layers {indices} name the same layer twice (indices {found})")
            llm_layers = llm_layers[0] if len(llm_layers) == 1 else llm_layers
        model = cls(slm_module, llm_layers, task=task, **task_options)
        if isinstance(slm, (str, os.PathLike)):
            # the SLM's tokenizer rides along: save_pretrained writes it, predict() uses it
            model.tokenizer = _slm_tokenizer(slm)
        return model

    # -- input checks ---------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, inputs_embeds):
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if ref.dim() < 2 or ref.shape[0] == 0 or ref.shape[1] == 0:
            raise ValueError(f"empty batch: inputs have shape {tuple(ref.shape)}")
        device = next(self.slm.parameters()).device
        if ref.device != device:
            raise ValueError(f"inputs are on {ref.device} but the model is on {device}")
        if input_ids is not None and input_ids.is_floating_point():
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if attention_mask is not None:
            if attention_mask.shape != ref.shape[:2]:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the "
                                 f"inputs have shape {tuple(ref.shape[:2])}")
            if attention_mask.device != device:
                raise ValueError(f"attention_mask is on {attention_mask.device}, model on {device}")
            # (data-dependent: skipped while torch.compile traces, so the graph does not break;
            # the fused layer still refuses a row with no real token at run time)
            if not torch.compiler.is_compiling() and not bool(
                    (attention_mask != 0).any(-1).all()):
                rows = (~(attention_mask != 0).any(-1)).nonzero().flatten().tolist()
                raise ValueError(f"attention_mask rows {rows} are all zeros (no real token)")
        full_seq = self.task != "classification"
        max_pos = getattr(self.llm_config, "max_position_embeddings", None)  # None: no LLM
        if full_seq and max_pos is not None and ref.shape[1] > max_pos:
            raise ValueError(f"sequence length {ref.shape[1]} exceeds the LLM's "
                             f"max_position_embeddings ({max_pos})")

    def check_values(self, input_ids=None, labels=None, rows=None):
        """ValueError naming the value, the limit and the row when a token id is outside the
        SLM's vocabulary or a label outside the task's classes. ``rows``: the dataset example
        index of each batch row, for the message."""
        def name(i):
            return f"row {i}" if rows is None else f"batch row {i} (example {rows[i]})"

        if input_ids is not None:
            vocab = self.slm.get_input_embeddings().num_embeddings
            bad = (input_ids < 0) | (input_ids >= vocab)
            if bool(bad.any()):
                idx = bad.nonzero()[0]
                at = name(int(idx[0])) + (f", position {int(idx[1])}" if len(idx) > 1 else "")
                raise ValueError(f"input_ids {at}: token id {int(input_ids[tuple(idx)])} is "
                                 f"outside the SLM's vocabulary of {vocab} ids (0..{vocab - 1})")
        if labels is None:
            return
        if self.task == "seq2seq":
            limit = self.slm.get_output_embeddings().out_features
        elif self.task in ("classification", "token_classification") and self.num_labels > 1:
            limit = self.num_labels
        else:
            return  # QA positions are clamped by design; regression labels are any number
        bad = ((labels < 0) | (labels >= limit)) & (labels != -100)
        if bool(bad.any()):
            idx = bad.nonzero()[0]
            r = int(idx[0])
            raise ValueError(f"labels {name(r)}: {int(labels[tuple(idx)])} is outside 0.."
                             f"{limit - 1} ({'num_labels' if self.task != 'seq2seq' else 'vocab'}"
                             f"={limit}; -100 means ignore)")

    def _should_validate(self, tensor) -> bool:
        if torch.compiler.is_compiling():  # a data-dependent check would break the graph
            return False
        if self.validate_inputs is not None:
            return bool(self.validate_inputs)
        return tensor is not None and not tensor.is_cuda

    # -- forward --------------------------------------------------------------------------------
    def _through_layer(self, enc: torch.Tensor, attention_mask) -> torch.Tensor:
        """L_out(layer(L_in(enc))) with the layer run in its own dtype."""
        if self.llm_config is None:
            return enc
        h = self.adapter_in(enc).to(self.layer_dtype)
        mask = None
        if attention_mask is not None and not self.attend_to_padding and h.shape[1] > 1:
            mask = attention_mask != 0
        h = self._run_layer(h, mask)
        return self.adapter_out(h.to(next(self.adapter_out.parameters()).dtype))

    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        """SLM encoder -> adapters and LLM layer. CLS mode returns (B, 1, d), else (B, S, d)."""
        self._check_inputs(input_ids, attention_mask, inputs_embeds)
        return self._encode(input_ids, attention_mask, token_type_ids, inputs_embeds)

    def _encode(self, input_ids, attention_mask, token_type_ids, inputs_embeds):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "inputs_embeds": inputs_embeds}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.task == "classification":
            return self._through_layer(self._sentence_vectors(kwargs), attention_mask)
        encoder = self.slm.get_encoder() if self.task == "seq2seq" else self.slm
        return self._through_layer(encoder(**kwargs).last_hidden_state, attention_mask)

    def _sentence_vectors(self, slm_inputs: dict) -> torch.Tensor:
        """(B, 1, d): the SLM's vector of each sentence, [CLS] (its first token) for encoders,
        the last real token for a decoder-only SLM. pifi_fast.PiFiModel computes the same from
        the real tokens only where it can (pifi_fast.packed_slm)."""
        enc = self.slm(**slm_inputs).last_hidden_state
        if self.pooling == "first":
            return enc[:, :1]  # only [CLS], as a length-1 sequence at position 0
        # the last real token (right or left padding alike)
        attention_mask = slm_inputs["attention_mask"]
        last = (torch.arange(enc.shape[1], device=enc.device).expand(enc.shape[:2])
                if attention_mask is None else
                torch.arange(enc.shape[1], device=enc.device) * (attention_mask != 0))
        rows = torch.arange(enc.shape[0], device=enc.device)
        return enc[rows, last.argmax(-1)].unsqueeze(1)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                inputs_embeds=None, start_positions=None, end_positions=None,
                decoder_input_ids=None, decoder_attention_mask=None, return_dict=True, **kwargs):
        self._check_inputs(input_ids, attention_mask, inputs_embeds)
        if self._should_validate(input_ids if input_ids is not None else inputs_embeds):
            self.check_values(input_ids, labels)
        h = self._encode(input_ids, attention_mask, token_type_ids, inputs_embeds)
        if self.task == "seq2seq":
            # no key/value cache unless asked for: nothing decodes incrementally through this
            # forward (generate() has its own path), and building one deep-copies the config,
            # a graph break under torch.compile on transformers 5.17 (the GPU image's)
            kwargs.setdefault("use_cache", False)
            return self.slm(encoder_outputs=BaseModelOutput(last_hidden_state=h),
                            attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                            decoder_attention_mask=decoder_attention_mask, labels=labels,
                            return_dict=True, **kwargs)
        if self.task == "classification":
            logits = self.head(h[:, 0])
            loss = None
            if labels is not None:
                if self.num_labels == 1:
                    loss = nn.functional.mse_loss(logits.squeeze(-1), labels.float())
                else:
                    loss = nn.functional.cross_entropy(logits, labels,
                                                       label_smoothing=self.label_smoothing)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        if self.task == "token_classification":
            logits = self.head(h)
            loss = None
            if labels is not None:
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                   ignore_index=-100,
                                                   label_smoothing=self.label_smoothing)
            return TokenClassifierOutput(loss=loss, logits=logits)
        start, end = self.head(h).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        if attention_mask is not None:
            # A span never starts or ends on padding: give padding no probability, so the loss
            # does not depend on how the batch was padded (nor on the layer's output there).
            pad = attention_mask == 0
            start = start.masked_fill(pad, torch.finfo(start.dtype).min)
            end = end.masked_fill(pad, torch.finfo(end.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start.shape[1]
            s_pos = start_positions.clamp(0, ignored)
            e_pos = end_positions.clamp(0, ignored)
            loss = (nn.functional.cross_entropy(start, s_pos, ignore_index=ignored)
                    + nn.functional.cross_entropy(end, e_pos, ignore_index=ignored)) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **generate_kwargs):
        """Seq2seq only: encoder -> PiFi layer -> the SLM's own decoder and generate()."""
        if self.task != "seq2seq":
            raise ValueError("generate() needs task='seq2seq'")
        h = self.encode(input_ids, attention_mask)
        return self.slm.generate(encoder_outputs=BaseModelOutput(last_hidden_state=h),
                                 attention_mask=attention_mask, **generate_kwargs)

    # -- save / load ----------------------------------------------------------------------------
    def frozen_layer_sha256(self) -> str:
        """sha256 over the frozen layer's tensors as this model holds them (names, dtypes,
        shapes and bytes, in key order): what a lean checkpoint verifies on load."""
        import hashlib

        digest = hashlib.sha256()
        for key, t in sorted(self.llm_layer.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    def can_reference_frozen_layer(self) -> str | None:
        """None when a lean checkpoint can reference the frozen layer, else why not."""
        if self.llm_config is None:
            return "the model has no LLM layer"
        if not self.freeze:
            return "the layer is trained (freeze=False): its weights must be stored"
        source = self.llm_source
        if not source or source == "random":
            return "the layer has no source to re-read (random weights, or built from a module)"
        if (Path(source) / CONFIG_NAME).is_file():
            return "the layer came from a PiFi checkpoint, not from an LLM's own files"
        return None

    def save_pretrained(self, directory, extra_files: dict | None = None,
                        into_existing: bool = False, frozen_layer: str = "full") -> Path:
        """One folder: pifi_config.json + model.safetensors (the single LLM layer stored once).

        frozen_layer="reference" writes a lean checkpoint: the trainable weights only, and a
        reference to the frozen layer (its source, layer index, dtype, 8-bit mode and a sha256
        over its tensors); from_pretrained re-reads just that layer from its source and checks
        the hash. A layer that cannot be referenced (random, trained, or itself from a PiFi
        checkpoint) makes this a ValueError naming why.

        Written into a temporary sibling folder and renamed into place, so an interrupted save
        never leaves a folder that loads as a checkpoint (an existing one is replaced only
        after the new one is complete). extra_files: {name: writer(path)} written inside it too
        (a tokenizer, a trainer state), so they are replaced atomically with the weights.
        into_existing=True keeps whatever else the folder holds (a Trainer's output folder with
        its checkpoints) and moves only our files in, the weights last: a folder with the new
        config but old weights can exist for an instant, never one without weights.
        """
        from safetensors.torch import save_file

        target = Path(directory).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            if frozen_layer not in ("full", "reference"):
                raise ValueError(f"frozen_layer must be 'full' or 'reference', got "
                                 f"{frozen_layer!r}")
            reference = None
            if frozen_layer == "reference":
                why = self.can_reference_frozen_layer()
                if why:
                    raise ValueError(f"cannot write a lean checkpoint: {why}")
                reference = {"source": str(self.llm_source), "layer": self.llm_index,
                             "dtype": str(self.layer_dtype).replace("torch.", ""),
                             "weights": self._options.get("weights", "auto"),
                             "sha256": self.frozen_layer_sha256()}
            state = {k: v.detach().to("cpu").contiguous().clone()
                     for k, v in self.state_dict().items()
                     if reference is None or not k.startswith("llm_layer.")}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            config = {
                "pifi_fast_version": _version(),
                "options": self._options,
                "labels": self.labels,
                "llm_source": self.llm_source,
                "frozen_layer": reference,
                "llm_index": self.llm_index,
                "layer_dtype": None if self.llm_config is None else
                str(self.layer_dtype).replace("torch.", ""),
                "slm_config": self.slm.config.to_dict(),
                "llm_config": None if self.llm_config is None else self.llm_config.to_dict(),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
            extra_files = dict(extra_files or {})
            if getattr(self, "tokenizer", None) is not None:  # (a caller's own one wins)
                extra_files.setdefault("tokenizer", self.tokenizer.save_pretrained)
            for name, writer in extra_files.items():
                writer(tmp / name)
            if into_existing and target.is_dir():
                for item in sorted(tmp.iterdir(), key=lambda p: p.name == WEIGHTS_NAME):
                    dest = target / item.name
                    if dest.is_dir():
                        shutil.rmtree(dest)
                    os.replace(item, dest)
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu", llm_source: str | None = None):
        """A saved model, full or lean. For a lean checkpoint the frozen layer is re-read from
        the recorded source (or ``llm_source``, when the files moved) and its sha256 checked."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

        if not Path(directory).expanduser().exists() and _looks_like_repo_id(str(directory)):
            from pifi_fast import hub

            directory = hub.download(str(directory))  # or the cache, with HF_HUB_OFFLINE=1
        directory = Path(directory).expanduser()
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{directory} is not a PiFi checkpoint (needs {CONFIG_NAME} "
                                    f"and {WEIGHTS_NAME})")
        from pifi_fast.loading import check_safetensors_file

        check_safetensors_file(w_path)  # a cut file: an error naming it, not a header error
        cfg = json.loads(cfg_path.read_text())
        opts = dict(cfg["options"])
        slm_cfg = dict(cfg["slm_config"])
        slm_config = AutoConfig.for_model(slm_cfg.pop("model_type"), **slm_cfg)
        state = load_file(str(w_path), device=str(map_location))
        slm_cls = AutoModelForSeq2SeqLM if opts["task"] == "seq2seq" else AutoModel
        slm = slm_cls.from_config(slm_config)
        llm = None
        reference = cfg.get("frozen_layer")
        if reference is not None:
            llm = _reread_frozen_layer(reference, llm_source, directory)
        elif cfg["llm_config"] is not None:
            llm_cfg = dict(cfg["llm_config"])
            llm_config = AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg)
            layer_sd = {k[len("llm_layer."):]: v for k, v in state.items()
                        if k.startswith("llm_layer.")}
            # 8-bit projections: the Hugging Face module the layer is built from takes their
            # dequantized values; the stored 8-bit tensors then load as they are (below)
            from pifi_fast.kernels.quant import dequantize

            layer_sd = {k: dequantize(v, layer_sd[k + "_scale"]) if k + "_scale" in layer_sd
                        else v for k, v in layer_sd.items() if not k.endswith("_scale")}
            dtype = getattr(torch, cfg["layer_dtype"])
            if isinstance(cfg["llm_index"], list):  # several layers: keys "<i>.<HF key>"
                llm = [build_layer(llm_config, index, {k[len(f"{i}."):]: v
                                                       for k, v in layer_sd.items()
                                                       if k.startswith(f"{i}.")},
                                   dtype=dtype, source=str(directory))
                       for i, index in enumerate(cfg["llm_index"])]
            else:
                llm = build_layer(llm_config, cfg["llm_index"], layer_sd, dtype=dtype,
                                  source=str(directory))
        model = cls(slm, llm, labels=cfg.get("labels"), **opts)
        if reference is not None:
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("llm_layer.")]
            if missing or unexpected:
                raise RuntimeError(f"{directory}: lean checkpoint does not fit the model: "
                                   f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            got = model.frozen_layer_sha256()
            if got != reference["sha256"]:
                raise CheckpointError(
                    f"{directory}: the frozen layer re-read from {llm.source} (layer "
                    f"{reference['layer']}) differs from the one trained with: sha256 {got} "
                    f"!= {reference['sha256']} (the source changed?)")
        else:
            model.load_state_dict(state, strict=True)
        model.llm_source = cfg.get("llm_source", model.llm_source)
        model.loaded_from = directory
        if (directory / "tokenizer").is_dir():  # written beside the weights by save_pretrained
            from transformers import AutoTokenizer

            model.tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
        return model

    def merge_lora(self) -> None:
        """Fold the SLM's LoRA updates into its weights (for export): the model then saves and
        loads as a plain one, without peft."""
        if "lora" not in self._options:
            return
        self.slm = self.slm.merge_and_unload()
        del self._options["lora"]

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None,
                    commit_message: str = "Upload PiFi model") -> str:
        """Upload this model with a model card to the Hugging Face Hub (pifi_fast.hub); a model
        loaded from a checkpoint folder uploads that folder (tokenizer and results too)."""
        from pifi_fast import hub

        return hub.push_to_hub(self, repo_id, private=private, token=token,
                               commit_message=commit_message,
                               source_folder=getattr(self, "loaded_from", None))

    # -- prediction -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, texts, pairs=None, *, tokenizer=None, batch_size: int = 64,
                max_length: int = 100, progress=None, execution: str = "eager",
                length_bucket: int = 16) -> list[dict]:
        """Classify raw texts (and second sentences for pair tasks): for each, the predicted
        label (as the training data spelled it, when the model knows its labels) and every
        label's probability. The tokenizer saved beside the model is used unless one is given.
        Sentences are batched by length (little padding) and run in inference mode, under
        bf16/fp16 autocast on a GPU; results come back in the input order. ``progress``: a
        callable taking the number of sentences just done (e.g. a tqdm bar's update).
        ``execution``: "eager", "compile" or "cuda-graphs" (see inference_runner); compiled,
        batch lengths are padded to multiples of ``length_bucket`` (few distinct shapes)."""
        if self.task != "classification":
            raise ValueError(f"predict() classifies; this model's task is {self.task!r}")
        tok = tokenizer or getattr(self, "tokenizer", None)
        if tok is None:
            raise ValueError("predict() needs a tokenizer: pass tokenizer=..., or load a "
                             "checkpoint saved with one (pifi-fast train saves it)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(pairs)} pairs for {len(texts)} texts")
        device = next(self.parameters()).device
        names = self.labels or list(range(self.num_labels))
        dtype = (torch.bfloat16 if device.type == "cuda" and torch.cuda.get_device_capability(
            device)[0] >= 8 else torch.float16)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
        from pifi_fast.data import pad_to_bucket

        # one runner per execution and device, kept: a fresh torch.compile per call would
        # compile again each time (and fall back to eager after torch's recompile limit)
        runners = self.__dict__.setdefault("_inference_runners", {})
        key = (execution, str(device))
        if key not in runners:
            runners[key] = inference_runner(self, execution)
        runner = runners[key]
        bucket = length_bucket if runner is not self else None
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[dict | None] = [None] * len(texts)
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tok([texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None,
                          truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
                enc = pad_to_bucket(enc, bucket, max_length, tok.pad_token_id).to(device)
                # (compiled: no_grad only, not inference_mode: compiling in inference mode can
                # break the same model's later compilation for training, pytorch/pytorch#135892)
                with torch.inference_mode(runner is self), autocast:
                    logits = runner(**{k: v for k, v in enc.items() if k in (
                        "input_ids", "attention_mask", "token_type_ids")}).logits
                probs = logits.float().softmax(-1).cpu()
                for row, i in enumerate(idx):
                    p = probs[row].tolist()
                    best = max(range(len(p)), key=p.__getitem__)
                    results[i] = {"label": names[best],
                                  "probabilities": {str(n): v for n, v in zip(names, p)}}
                if progress is not None:
                    progress(len(idx))
        finally:
            self.train(was_training)
        return results


EXECUTIONS = ("eager", "compile", "cuda-graphs")


def compile_model(model: nn.Module, cuda_graphs: bool = False):
    """torch.compile(model) as pifi_fast compiles it everywhere (training, evaluation, prediction,
    benchmarks). On a CPU, random ops (dropout) fall back to ATen's (Inductor's fallback_random):
    Inductor's own CPU random numbers cost more than the whole compile gains. Measured on 2 cores
    (MiniLM + SmolLM2, fp32, median of 3 alternating runs): train step on 32 sentences x1.00 of
    eager with Inductor's RNG, x1.08 with ATen's; QA step on 8 x 384 tokens x0.87 -> x1.05. On a
    GPU Inductor fuses its RNG into the generated kernels, so it stays on there.
    ``cuda_graphs``: mode="reduce-overhead" (CUDA devices; see inference_runner).

    Without CUDA graphs the compiled model's calls run with Dynamo's
    capture_dynamic_output_shape_ops on (for its calls only, not globally), so a classification
    model that packs its SLM (pifi_fast.packed_slm: a token count that depends on the mask)
    stays one graph and packs compiled as it does eager. Measured on 2 cores (MiniLM, 32 random
    SST-2 sentences, SLM forward + backward): compiled packed 417 ms, eager packed 495 ms,
    compiled on the padded layout 764 ms. CUDA graphs need static shapes: under them the SLM
    keeps the padded layout."""
    if cuda_graphs:
        return torch.compile(model, mode="reduce-overhead")
    if next(model.parameters()).device.type == "cpu":
        compiled = torch.compile(model, options={"fallback_random": True})
    else:
        compiled = torch.compile(model)
    capture = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
    compiled.forward = capture(compiled.forward)
    return compiled


def inference_runner(model: nn.Module, execution: str = "eager"):
    """What evaluation and prediction call instead of ``model``: the model itself ("eager"),
    ``torch.compile(model)`` ("compile"), or ("cuda-graphs") the model compiled with
    mode="reduce-overhead", which records one CUDA graph per input shape and replays it: the
    hundreds of small kernel launches of a short-sentence batch become one. The fused layer's
    op that unpads a padding mask (a host sync) is tagged cudagraph_unsafe and runs eagerly
    between captured parts; in [CLS] mode it has nothing to unpad and is captured with the rest.
    CUDA graphs need a CUDA device: elsewhere "cuda-graphs" warns and compiles without them.
    Outputs of a CUDA-graph replay are overwritten by the next call: use them (argmax, .cpu())
    before calling again, as evaluation and predict() do."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if execution == "eager":
        return model
    device = next(model.parameters()).device
    if execution == "cuda-graphs" and device.type != "cuda":
        import warnings

        warnings.warn(f"CUDA graphs need a CUDA device; the model is on {device}, so it runs "
                      "compiled without them (torch.compile, default mode)", RuntimeWarning,
                      stacklevel=2)
        execution = "compile"
    if execution == "compile":
        return compile_model(model)
    compiled = compile_model(model, cuda_graphs=True)

    def replay(*args, **kwargs):
        # each call is a new step of the CUDA graph trees: the previous call's outputs may be
        # overwritten now (they were consumed), so no step is kept alive waiting for them
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return replay


def _with_lora(slm: nn.Module, lora: dict) -> nn.Module:
    """The SLM wrapped by peft with LoRA: lora = {"r", "alpha", "dropout", "targets"}; targets
    None takes peft's default modules for the architecture (BERT: query, value)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("LoRA needs peft: pip install peft (or pifi-fast[train])") from exc
    targets = lora.get("targets")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora.get("alpha", 16)),
                        lora_dropout=float(lora.get("dropout", 0.0)),
                        target_modules=targets or None, bias="none")
    try:
        return get_peft_model(slm, config)
    except ValueError as exc:
        raise ValueError(f"LoRA on {slm.config.model_type}: {exc} (name the modules with "
                         "--lora-targets, e.g. query,value)") from exc


def _looks_like_repo_id(name: str) -> bool:
    """org/name (one slash, no path syntax): a Hub repo id rather than a missing folder."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not name.endswith("/"))


def _reread_frozen_layer(reference: dict, override: str | None, directory: Path):
    """The frozen layer of a lean checkpoint, read again from its source."""
    source = override or reference["source"]
    local = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or local.suffix == ".gguf"
    if looks_local and not local.exists():
        raise FileNotFoundError(
            f"{directory} is a lean checkpoint: its frozen layer is layer {reference['layer']} of "
            f"{source}, which is missing here; pass from_pretrained(..., llm_source=PATH) to "
            "point at it, or use a full checkpoint")
    dtype = getattr(torch, reference["dtype"])
    if isinstance(reference["layer"], list):  # several plugged layers
        return [load_llm_layer(source, i, dtype=dtype) for i in reference["layer"]]
    return load_llm_layer(source, reference["layer"], dtype=dtype)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pifi-fast")
    except metadata.PackageNotFoundError:
        return "unknown"
