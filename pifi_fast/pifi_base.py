"""What the reference PiFi and pifi_fast.PiFiModel share: the SLM, the two adapters, the task
heads, construction, input checks, forward and generate. Only the frozen LLM layer differs
between the two (`_make_layer` / `_run_layer`), so a checkpoint of one loads into the other.
Saving and loading come from pifi_fast.persistence, predict() from pifi_fast.inference (mixins:
one concern per module, one class for the user).

    h_enc = SLM_encoder(x);  h = L_out(LLM_layer(L_in(h_enc)));  y = Head(h)

Tasks:
  classification      one sentence vector ([CLS] by default; POOLINGS), as a length-1
                      sequence at position 0; head
                      Linear(d,d) -> Dropout(0.2) -> GELU -> Linear(d,C); sentence pairs too
  question_answering  whole sequence, bidirectional; start/end logits
  token_classification whole sequence; one label per token
  seq2seq             T5/BART: the layer sits between encoder and decoder
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer,
                          PretrainedConfig)
from transformers.modeling_outputs import (
    BaseModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)

from pifi_fast.inference import PredictionMixin
from pifi_fast.loading import LLMLayer, load_llm_layer, random_layer, resolve_index
from pifi_fast.persistence import PersistenceMixin

TASKS = ("classification", "question_answering", "token_classification", "seq2seq")
_TASK_ALIASES = {"sequence_classification": "classification", "pair_classification":
                 "classification", "nli": "classification", "qa": "question_answering",
                 "ner": "token_classification", "translation": "seq2seq",
                 "summarization": "seq2seq"}


def _hidden(config) -> int:
    return getattr(config, "hidden_size", None) or config.d_model


def _load_slm(slm, task: str):
    """SLM from a Hub id / folder, a config (random init) or a ready module."""
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
    try:
        return AutoTokenizer.from_pretrained(slm)
    except (OSError, ValueError, ImportError):  # no tokenizer files, unreadable, or a missing
        return None                              # optional package (sentencepiece)


ADAPTERS = ("linear", "mlp")

# The sentence vector of classification (the authors' --padding): "cls" the first token
# (their `cls`, our default for encoders), "mean" the mean over the real tokens (their
# `average_pooling_without_padding`), "mean-with-padding" the mean over every position, padding
# included (their `average_pooling_with_padding`), "last" the last real token (our default for a
# decoder-only SLM, whose first token sees only itself).
POOLINGS = ("cls", "mean", "mean-with-padding", "last")


def default_pooling(slm_config) -> str:
    """The pooling a model gets when none is named (and a checkpoint saved without one loads
    with): the last real token for a decoder-only SLM, [CLS] (the first token) otherwise."""
    return "last" if _decoder_only(slm_config) else "cls"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None,
         pooling: str) -> torch.Tensor:
    """(B, 1, d): one vector per sentence from the SLM's last_hidden_state ``hidden`` (B, S, d)
    and its (B, S) mask of real tokens (None: every position is real), as a length-1 sequence
    at position 0 (what the frozen layer sees). ``pooling``: one of POOLINGS."""
    if pooling == "cls":
        return hidden[:, :1]  # only [CLS], as a length-1 sequence at position 0
    if pooling == "mean-with-padding":
        # The authors' average_pooling_with_padding: every position, padding included. The
        # vector depends on how the batch was padded (a sentence padded to 100 tokens is not the
        # one padded to its batch's longest), which is why it is not our default; it reproduces
        # their runs, which padded every sentence to max_length.
        return hidden.mean(1, keepdim=True)
    if attention_mask is None:
        real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    else:
        real = attention_mask != 0
    if pooling == "mean":  # over the real tokens only: the same for any padding
        weights = real.to(hidden.dtype).unsqueeze(-1)
        count = real.sum(1, keepdim=True).clamp(min=1).to(hidden.dtype)
        return ((hidden * weights).sum(1) / count).unsqueeze(1)
    if pooling == "last":  # the last real token (right or left padding alike)
        last = (torch.arange(hidden.shape[1], device=hidden.device) * real).argmax(-1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last].unsqueeze(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


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


def _with_lora(slm: nn.Module, lora: dict) -> nn.Module:
    """The SLM wrapped by peft with LoRA: lora = {"r", "alpha", "dropout", "targets"}; targets
    None takes peft's default modules for the architecture (BERT: query, value)."""
    try:  # deferred: peft is optional (the train extra), needed for LoRA only
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


class PiFiBase(PersistenceMixin, PredictionMixin, nn.Module):
    """PiFi around any SLM; subclasses choose how the frozen LLM layer is run."""

    def __init__(self, slm: nn.Module, llm: LLMLayer | list[LLMLayer] | None,
                 task: str = "classification",
                 num_labels: int = 2, label_smoothing: float = 0.0, head_dropout: float = 0.2,
                 attend_to_padding: bool = False, freeze: bool = True,
                 validate_inputs: bool | None = None, labels: list | None = None,
                 lora: dict | None = None, adapter: str = "linear",
                 adapter_width: int | None = None, pooling: str | None = None,
                 **layer_options):
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
        # the sentence vector for classification (POOLINGS; None: [CLS] for encoders, the last
        # real token for a decoder-only SLM, whose first token sees only itself)
        if pooling is not None and task != "classification":
            raise ValueError(f"pooling applies to task 'classification' only (its sentence "
                             f"vector); task {task!r} runs the whole sequence through the layer")
        self._default_pooling = default_pooling(slm.config)
        self.pooling = pooling
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
        if task == "classification":
            # the resolved mode: a checkpoint keeps it whatever the defaults become (one saved
            # without it, before pooling was an option, loads with its SLM kind's default)
            self._options["pooling"] = self.pooling

    @property
    def pooling(self) -> str:
        """The classification sentence vector: one of POOLINGS (see pool). Settable (None: the
        SLM kind's default); save_pretrained stores it."""
        return self._pooling

    @pooling.setter
    def pooling(self, value: str | None):
        if value is None:
            value = self._default_pooling
        if value not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} (or None: "
                             f"{self._default_pooling!r} for this SLM), got {value!r}")
        self._pooling = value
        if getattr(self, "_options", None) is not None and self.task == "classification":
            self._options["pooling"] = value

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

    def classify_sentence_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Classification logits from the SLM's sentence vectors (B, 1, d_slm), as ``encode`` of
        the SLM alone gives them: the adapters, the frozen layer and the head, all that forward
        runs after the SLM (pifi_fast.training.select_layer trains these on cached vectors)."""
        return self.head(self._through_layer(vectors, None)[:, 0])

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
        """(B, 1, d): the SLM's vector of each sentence, pooled from its last_hidden_state as
        self.pooling says (see pool). pifi_fast.PiFiModel computes the "cls" one from the real
        tokens only where it can (pifi_fast.packed_slm)."""
        enc = self.slm(**slm_inputs).last_hidden_state
        return pool(enc, slm_inputs["attention_mask"], self.pooling)

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
