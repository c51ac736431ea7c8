"""Attention over packed (unpadded) tokens, with one place that picks the backend.

Inputs are packed: q (T, Hq, D), k and v (T, Hkv, D), and a ``Segments`` object saying where
each sequence starts (cu_seqlens) or, when nothing was removed, the dense (B, S) shape.
Backends, best first; ``select_backend`` decides and ``backend_used`` reports (and the first
call logs once) which one ran:

    flash_attn      the flash-attn package (FA3 ``flash_attn_interface`` or FA2), varlen
                    entry point; CUDA sm_80+, fp16/bf16; optional extra ``pifi-fast[flash]``
    torch_varlen    torch.nn.attention.varlen.varlen_attn (PyTorch's own FlashAttention /
                    cuDNN varlen kernels; torch >= 2.10); CUDA sm_80+, fp16/bf16
    sdpa            F.scaled_dot_product_attention on the dense (B, H, S, D) layout, with a key
                    mask when the batch had padding (PyTorch picks flash, cuDNN, memory-efficient
                    or math); runs everywhere, and is the plain twin of the others. On
                    Turing (T4, sm_75) it is the only one: FlashAttention 2 needs sm_80, and
                    SDPA takes its memory-efficient kernel there

Attention is bidirectional unless ``causal=True``. A sliding ``window`` (Mistral v0.1, Gemma-2's
and Qwen2's sliding layers) hides keys ``window`` or more positions from the query (on both
sides when bidirectional): flash_attn takes it as its window_size, torch_varlen where its
signature has one, and sdpa as a band in its mask; a window no shorter than the longest
sequence changes nothing and is dropped. Distances are between columns of the padded batch, as
the reference counts positions (0..S-1 per row); the varlen kernels count them within the packed
sequence, the same only without padding, so a padded batch with a window runs on sdpa.

Soft-capped scores (Gemma-2: ``softcap`` c, scores tanh(s / c) * c before the softmax): only
flash_attn computes them (its softcap argument); elsewhere the ``math`` path does, the plain
scores-softmax-values product on the dense layout, as Hugging Face's eager attention computes it
(memory grows with S^2; said once in the log). All backends are differentiable through
autograd; pifi_fast.frozen differentiates them by recomputing the forward in backward, so no
attention output or log-sum-exp is kept between forward and backward.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("pifi_fast")

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")


@dataclass
class Segments:
    """Where the packed tokens come from.

    indices: (T,) positions of the real tokens in the flattened (B*S) batch, or None when the
    batch had no padding (then T = B*S and the packed tensor is a plain view).
    cu_seqlens: (B+1,) int32 start offsets of each sequence in the packed tensor.
    max_seqlen: the longest real sequence (a Python int).
    """

    batch: int
    seq: int
    indices: torch.Tensor | None
    cu_seqlens: torch.Tensor
    max_seqlen: int
    mask: torch.Tensor | None = None  # (B, S) bool, True for real tokens; None when dense

    @classmethod
    def dense(cls, batch: int, seq: int, device) -> "Segments":
        cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
        return cls(batch, seq, None, cu, seq)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "Segments":
        """From a (B, S) bool mask of real tokens (rows may be padded anywhere; every row needs
        one real token). One host sync: the row lengths, which give the packed size, the
        longest row and whether anything is padded at all; the gather indices then come from
        nonzero_static with that known size, so no second sync."""
        b, s = mask.shape
        lengths = mask.sum(1, dtype=torch.int32)
        host = lengths.tolist()
        if min(host) == 0:
            raise ValueError("attention_mask has a row with no real token (all zeros)")
        if min(host) == s:
            return cls.dense(b, s, mask.device)  # nothing padded: the packed tensor is a view
        cu = torch.zeros(b + 1, dtype=torch.int32, device=mask.device)
        torch.cumsum(lengths, 0, out=cu[1:])
        indices = torch.nonzero_static(mask.reshape(-1), size=sum(host)).squeeze(1)
        return cls(b, s, indices, cu, max(host), mask)



# -- backend discovery -----------------------------------------------------------------------------
def _flash_attn_varlen():
    for module in ("flash_attn_interface", "flash_attn"):  # FA3 (Hopper) first, then FA2
        try:
            mod = __import__(module)
            return getattr(mod, "flash_attn_varlen_func")
        except (ImportError, AttributeError, OSError):
            continue
    return None


def _torch_varlen():
    try:  # deferred: torch.nn.attention.varlen exists in recent torch releases only
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_FLASH = _flash_attn_varlen()
_VARLEN = _torch_varlen()
_announced: set[str] = set()
backend_used: str | None = None  # the backend of the most recent call


failed_backends: dict[str, str] = {}  # backends that raised when chosen automatically, and why


# FlashAttention 2 (and PyTorch's varlen kernels built on it) need Ampere or newer
FLASH_MIN_CAPABILITY = (8, 0)


def available_backends(device_type: str = "cuda", capability: tuple | None = None) -> list[str]:
    """Usable backends, best first, for a device type and (CUDA) compute capability (None:
    the current device's)."""
    found = []
    if device_type == "cuda":
        if capability is None and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability()
        if capability is None or tuple(capability) >= FLASH_MIN_CAPABILITY:
            if _FLASH is not None:
                found.append("flash_attn")
            if _VARLEN is not None:
                found.append("torch_varlen")
    return [b for b in found if b not in failed_backends] + ["sdpa"]


def select_backend(q: torch.Tensor, requested: str | None = None) -> str:
    """The backend for these inputs: ``requested`` if given and usable, else the best usable
    one. (The layer's $PIFI_FAST_ATTENTION is applied by pifi_fast.frozen.options before.)"""
    requested = requested or "auto"
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"unknown attention backend {requested!r}; choose from {BACKENDS}")
    half = q.dtype in (torch.float16, torch.bfloat16)
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    usable = [b for b in available_backends(q.device.type, capability) if b == "sdpa" or half]
    if requested != "auto":
        if requested not in usable:
            raise ValueError(f"attention backend {requested!r} cannot run {q.dtype} on "
                             f"{q.device.type} here; usable: {usable}")
        return requested
    return usable[0]


def _announce(name: str, q: torch.Tensor):
    global backend_used
    backend_used = name
    if name not in _announced:
        _announced.add(name)
        log.info("pifi_fast attention backend: %s (%s, %s)", name, q.device.type, q.dtype)


# -- the backends ----------------------------------------------------------------------------------
def _dense(t, seg: Segments):
    """(B, H, S, D) from packed (T, H, D), zeros at padding."""
    b, s = seg.batch, seg.seq
    if seg.indices is not None:
        t = t.new_zeros(b * s, t.shape[1], t.shape[2]).index_copy(0, seg.indices, t)
    return t.view(b, s, t.shape[1], t.shape[2]).transpose(1, 2)


def _visible(seg: Segments, causal: bool, window: int | None, device):
    """(B or 1, 1, S, S) bool, True where a query may see a key: real keys, within the window,
    not in the future when causal; None when every key is visible or the only rule is
    causality (which SDPA then applies itself, is_causal=True)."""
    s = seg.seq
    mask = None if seg.indices is None else seg.mask[:, None, None, :]
    if window is not None:
        pos = torch.arange(s, device=device)
        band = (pos[:, None] - pos[None, :]).abs() < window
        mask = band if mask is None else mask & band
    if causal and mask is not None:
        mask = mask & torch.ones(s, s, dtype=torch.bool, device=device).tril()
    return mask


def _packed(o, seg: Segments, q):
    """(T, Hq, D) from the dense (B, Hq, S, D) output: the real tokens' rows."""
    o = o.transpose(1, 2).reshape(seg.batch * seg.seq, q.shape[1], q.shape[2])
    return o if seg.indices is None else o.index_select(0, seg.indices)


def _sdpa(q, k, v, seg: Segments, scale: float, causal: bool, window: int | None = None):
    mask = _visible(seg, causal, window, q.device)
    o = F.scaled_dot_product_attention(*(_dense(t, seg) for t in (q, k, v)), attn_mask=mask,
                                       scale=scale, is_causal=causal and mask is None,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return _packed(o, seg, q)


def _math(q, k, v, seg: Segments, scale: float, causal: bool, window: int | None,
          softcap: float | None):
    """Scores, soft-cap, mask, softmax (fp32 at least), values: Hugging Face's eager
    attention."""
    qd, kd, vd = (_dense(t, seg) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        kd, vd = kd.repeat_interleave(groups, 1), vd.repeat_interleave(groups, 1)
    scores = torch.matmul(qd, kd.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = _visible(seg, causal, window, q.device)
    if causal and visible is None:
        visible = torch.ones(seg.seq, seg.seq, dtype=torch.bool, device=q.device).tril()
    if visible is not None:
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    return _packed(torch.matmul(probs.to(q.dtype), vd), seg, q)


def _window_size(causal: bool, window: int | None) -> tuple[int, int]:
    """(keys to the left, keys to the right) a query sees, -1 for all, as flash-attn counts."""
    side = -1 if window is None else window - 1
    return (side, 0 if causal else side)


def _varlen_kwargs(fn, scale, causal, gqa, window=None):
    params = inspect.signature(fn).parameters
    kw = {"scale": scale}
    if window is not None:  # attention() sends a window only where the signature takes it
        kw["window_size"] = _window_size(causal, window)
    elif causal:
        if "window_size" in params:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw, gqa and "enable_gqa" not in params


def _torch_varlen_call(q, k, v, seg, scale, causal, window=None):
    gqa = q.shape[1] != k.shape[1]
    kw, repeat = _varlen_kwargs(_VARLEN, scale, causal, gqa, window)
    if repeat:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    cu = seg.cu_seqlens
    return _VARLEN(q, k, v, cu, cu, seg.max_seqlen, seg.max_seqlen, **kw)


def _flash_attn_call(q, k, v, seg, scale, causal, window=None, softcap=None):
    cu = seg.cu_seqlens
    kw = {} if window is None else {"window_size": _window_size(causal, window)}
    if softcap is not None:
        kw["softcap"] = softcap
    out = _FLASH(q, k, v, cu, cu, seg.max_seqlen, seg.max_seqlen, softmax_scale=scale,
                 causal=causal, **kw)
    return out[0] if isinstance(out, tuple) else out  # FA3 may return (out, lse)


def _takes_window(name: str, seg: Segments) -> bool:
    if name == "sdpa":
        return True
    fn = _FLASH if name == "flash_attn" else _VARLEN
    return (seg.indices is None and fn is not None
            and "window_size" in inspect.signature(fn).parameters)


def _takes_softcap(name: str) -> bool:
    return (name == "flash_attn" and _FLASH is not None
            and "softcap" in inspect.signature(_FLASH).parameters)


def attention(q, k, v, seg: Segments, scale: float, causal: bool = False,
              backend: str | None = None, window: int | None = None,
              softcap: float | None = None) -> torch.Tensor:
    """Packed attention: q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D); ``window``: the sliding
    window (None: every key); ``softcap``: the scores' tanh soft-cap (None: none)."""
    if window is not None and window >= seg.max_seqlen:
        window = None  # every pair of tokens is closer than the window
    name = select_backend(q, backend)
    if softcap is not None and not _takes_softcap(name):
        if backend:
            raise ValueError(f"attention backend {name!r} cannot soft-cap scores; use "
                             "flash_attn, or no backend (the math path then runs)")
        _announce("math", q)
        if q.is_cuda and "math-on-cuda" not in _announced:
            _announced.add("math-on-cuda")
            log.warning("pifi_fast attention: soft-capped scores and no flash-attn with softcap "
                        "here: the math path runs (correct; memory grows with S^2)")
        return _math(q, k, v, seg, scale, causal, window, softcap)
    if window is not None and not _takes_window(name, seg):
        if backend:
            raise ValueError(f"attention backend {name!r} takes no sliding window here; "
                             "use sdpa or flash_attn")
        name = "sdpa"  # the one backend always able to band its mask
    _announce(name, q)
    if name == "sdpa":
        return _sdpa(q, k, v, seg, scale, causal, window)
    call = (functools.partial(_flash_attn_call, softcap=softcap) if name == "flash_attn"
            else _torch_varlen_call)
    if backend:
        # asked for by name: its errors are the user's
        return call(q, k, v, seg, scale, causal, window)
    try:
        return call(q, k, v, seg, scale, causal, window)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        # An automatically chosen backend that cannot run these inputs (an older signature, an
        # unsupported head size, ...): say so once and use the next one from now on.
        failed_backends[name] = f"{type(exc).__name__}: {exc}"
        log.warning("pifi_fast attention backend %s failed (%s); falling back", name,
                    failed_backends[name])
        return attention(q, k, v, seg, scale, causal, window=window, softcap=softcap)
