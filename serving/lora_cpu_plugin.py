"""Faster multi-LoRA ops for vLLM on CPU, shipped as a vLLM general plugin.

vLLM's CPU punica wrapper (``vllm.lora.punica_wrapper.punica_cpu``) calls the PyTorch ops in
``vllm.lora.ops.torch_ops``; those gather a full copy of every token's A or B matrix
(``weights[token_indices]``, tokens x out x r) and einsum it, which is memory traffic per token
and per layer. This module replaces them with the "stacked" form (see docs/environment.md):

* shrink: one matmul of ``x`` with the A matrices of all slots in use, stacked (``S*r x in``),
  then each token picks its own ``r``-slice by slot;
* expand: each token's ``r``-vector is scattered into a zero ``tokens x S x r`` tensor at its
  slot, then one matmul with the B matrices of those slots, stacked (``S*r x out``).

Only the contiguous slot range ``[lo, hi]`` that the batch uses is stacked, so a batch with one
adapter is a plain matmul, and a batch without any adapter does no matmul at all.

Semantics are those of the stock ops (scale, ``add_inputs``, slice offsets, the cast of inputs
and weights to the output dtype, the ``common_len`` truncation of ``bgmv_expand``), with one
deliberate difference: a token index of -1 means "no LoRA" and contributes nothing (overwriting
ops write zeros for it), as the punica metadata documents and the GPU kernels do. The stock torch
ops instead index ``weights[-1]``, i.e. they apply the *last* slot's adapter to such tokens, which
is only harmless while that slot is empty. Cases this module does not handle (row-count
mismatches, weights of unexpected rank) fall back to the stock functions.

Hook: ``register()`` is the ``vllm.general_plugins`` entry point ``tuneserve_cpu_lora``; vLLM
runs it in every process (API process, engine core, workers). On the CPU platform it rebinds
the six op names in the ``punica_cpu`` module namespace (that module did ``from ... import``).
``TUNESERVE_CPU_LORA_FAST=0`` leaves the stock ops in place.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

ENV_FLAG = "TUNESERVE_CPU_LORA_FAST"
TARGET_MODULE = "vllm.lora.punica_wrapper.punica_cpu"
OP_NAMES = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)

# Stock functions as found in the punica_cpu namespace before patching (filled by register()).
_STOCK: dict[str, Callable[..., Any]] = {}
_ACTIVE = False


# --------------------------------------------------------------------------- token metadata


class _IndexMeta:
    """What the stacked ops need to know about one batch's token -> slot mapping."""

    __slots__ = ("num_tokens", "lo", "n", "local", "has_neg", "all_neg", "neg_mask", "rows", "scatter_idx")

    def __init__(self, indices: torch.Tensor):
        idx = indices.to(torch.long)
        self.num_tokens = idx.numel()
        neg = idx < 0
        self.has_neg = bool(neg.any())
        self.all_neg = self.num_tokens == 0 or bool(neg.all())
        self.neg_mask = neg.unsqueeze(1) if self.has_neg else None
        self.rows = None
        self.scatter_idx = None
        if self.all_neg:
            self.lo, self.n, self.local = 0, 0, None
            return
        valid = idx[~neg] if self.has_neg else idx
        lo, hi = (int(v) for v in torch.aminmax(valid))
        self.lo, self.n = lo, hi - lo + 1
        # Slot of each token relative to lo; tokens without LoRA go to the extra slot n, which
        # the scatter writes to and the matmul never reads (see _expand_rows).
        self.local = torch.where(neg, self.n, idx - lo) if self.has_neg else idx - lo
        if self.n > 1 or self.has_neg:
            self.rows = torch.arange(self.num_tokens, dtype=torch.long)
            stride = self.n + 1 if self.has_neg else self.n
            self.scatter_idx = self.rows * stride + self.local


# One-entry memo: every LoRA layer of a forward step sees the same token mapping. The key is
# the mapping's *content* (a private copy), so a stale hit is impossible.
_memo_key: torch.Tensor | None = None
_memo_meta: _IndexMeta | None = None


def _meta(indices: torch.Tensor) -> _IndexMeta:
    global _memo_key, _memo_meta
    key = _memo_key
    if key is not None and key.shape == indices.shape and key.dtype == indices.dtype and torch.equal(key, indices):
        return _memo_meta  # type: ignore[return-value]
    meta = _IndexMeta(indices)
    _memo_key, _memo_meta = indices.detach().clone(), meta
    return meta


# --------------------------------------------------------------------------- weight layouts

# Prepared (stacked / transposed / cast) weights, keyed by id(weight). An entry is valid while
# the weak reference still points at the same tensor object and its in-place version counter
# (bumped by vLLM's set_lora / reset_lora copies) and storage pointer are unchanged.
_wcache: dict[tuple[int, str, torch.dtype], tuple[Any, int, int, torch.Tensor]] = {}
_WCACHE_MAX = 4096


def _forget(key: tuple[int, str, torch.dtype], _ref: Any) -> None:
    """A cached tensor's weights were freed: drop its entry."""
    _wcache.pop(key, None)


def _cached(weights: torch.Tensor, kind: str, dtype: torch.dtype, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    try:
        version = weights._version
    except RuntimeError:  # inference tensors keep no version counter: do not cache
        return build()
    key = (id(weights), kind, dtype)
    hit = _wcache.get(key)
    if hit is not None and hit[0]() is weights and hit[1] == version and hit[2] == weights.data_ptr():
        return hit[3]
    prepared = build()
    if len(_wcache) >= _WCACHE_MAX:
        _wcache.clear()
    try:
        ref = weakref.ref(weights, functools.partial(_forget, key))
    except TypeError:  # pragma: no cover - tensors support weak references
        return prepared
    _wcache[key] = (ref, version, weights.data_ptr(), prepared)
    return prepared


def _as3d(weights: torch.Tensor) -> torch.Tensor | None:
    """(S, 1, o, i) or (S, o, i) -> (S, o, i); None for layouts the stock op would not squeeze."""
    if weights.dim() == 4 and weights.shape[1] == 1:
        return weights[:, 0]
    if weights.dim() == 3:
        return weights
    return None


def _stacked_rows(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All slots' matrices stacked on rows: (S*o, i), in ``dtype`` (shrink layout)."""
    w = _as3d(weights)
    assert w is not None
    s, o, i = w.shape
    if w.dtype == dtype and w.is_contiguous():
        return w.reshape(s * o, i)  # a free view, always current
    return _cached(weights, "rows", dtype, lambda: w.to(dtype).reshape(s * o, i).contiguous())


def _stacked_cols(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All slots' matrices transposed and stacked: (S*i, o), in ``dtype`` (expand layout)."""
    w = _as3d(weights)
    assert w is not None
    s, o, i = w.shape
    return _cached(
        weights,
        "cols",
        dtype,
        lambda: w.to(dtype).transpose(1, 2).contiguous().reshape(s * i, o),
    )


def _supported(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor) -> bool:
    return (
        inputs.dim() == 2
        and output.dim() == 2
        and indices.dim() == 1
        and _as3d(weights) is not None
        and inputs.shape[0] == output.shape[0] == indices.shape[0]
        and inputs.shape[1] == weights.shape[-1]
        and inputs.device.type == "cpu"
    )


# --------------------------------------------------------------------------- core computations


def _shrink_rows(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Per-token ``x_t @ W[idx_t].T`` (zeros where idx_t == -1), shape (T, o), in ``dtype``."""
    meta = _meta(indices)
    o = _as3d(weights).shape[1]  # type: ignore[union-attr]
    t = inputs.shape[0]
    if meta.all_neg:
        return inputs.new_zeros((t, o), dtype=dtype)
    x = inputs.to(dtype)
    w = _stacked_rows(weights, dtype)[meta.lo * o : (meta.lo + meta.n) * o]
    full = x @ w.t()  # (T, n*o): every token against every slot in use
    if meta.n == 1:
        out = full
    else:
        out = full.view(t, meta.n, o)[meta.rows, meta.local.clamp(max=meta.n - 1)]  # type: ignore[union-attr]
    if meta.has_neg:
        out = out.masked_fill(meta.neg_mask, 0)  # type: ignore[arg-type]  # set whenever has_neg
    return out


def _expand_rows(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """Per-token ``x_t @ W[idx_t].T`` for expand, shape (T, o); None when every idx is -1."""
    meta = _meta(indices)
    if meta.all_neg:
        return None
    w3 = _as3d(weights)
    r = w3.shape[2]  # type: ignore[union-attr]
    t = inputs.shape[0]
    x = inputs.to(dtype)
    w = _stacked_cols(weights, dtype)[meta.lo * r : (meta.lo + meta.n) * r]  # (n*r, o)
    if meta.n == 1 and not meta.has_neg:
        return x @ w
    width = meta.n + 1 if meta.has_neg else meta.n  # extra slot n collects the no-LoRA rows
    z = x.new_zeros((t * width, r))
    z.index_copy_(0, meta.scatter_idx, x)  # type: ignore[arg-type]  # set whenever n > 1 or has_neg
    z = z.view(t, width, r)[:, : meta.n].reshape(t, meta.n * r)
    return z @ w


# --------------------------------------------------------------------------- the six ops


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    if not _supported(inputs, lora_b_weights, output_tensor, lora_indices_tensor):
        return _STOCK_OPS["bgmv_shrink"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
    outputs = _shrink_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    if not _supported(inputs, lora_b_weights, output_tensor, lora_indices_tensor):
        return _STOCK_OPS["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    common_len = min(_as3d(lora_b_weights).shape[1], output_tensor.shape[1])  # type: ignore
    outputs = _expand_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:  # no token has a LoRA: adds nothing / writes zeros
        if not add_inputs:
            output_tensor[:, :common_len] = 0
        return
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:, :common_len]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=True
):
    if (
        not _supported(inputs, lora_b_weights, output_tensor, lora_indices_tensor)
        or _as3d(lora_b_weights).shape[1] != slice_size  # type: ignore[union-attr]
        or slice_offset + slice_size > output_tensor.shape[1]
    ):
        return _STOCK_OPS["bgmv_expand_slice"](
            inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs
        )
    outputs = _expand_rows(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]
    if outputs is None:
        if not add_inputs:
            target.zero_()
        return
    if add_inputs:
        target += outputs
    else:
        target.copy_(outputs)


def _explode(lora_indices_tensor, seq_len_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs,
    lora_a_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    scaling,
):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(
    inputs,
    lora_b_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    add_inputs=False,
):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    slice_offset,
    slice_size,
    add_inputs=False,
):
    bgmv_expand_slice(
        inputs,
        lora_b_weights,
        output_tensor,
        _explode(lora_indices_tensor, seq_len_tensor),
        slice_offset,
        slice_size,
        add_inputs,
    )


FAST_OPS: dict[str, Callable[..., Any]] = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


class _StockOps(dict):
    """The stock torch ops, imported on first use (fallback path)."""

    def __missing__(self, name: str) -> Callable[..., Any]:
        from vllm.lora.ops import torch_ops

        fn = getattr(torch_ops, name)
        self[name] = fn
        return fn


_STOCK_OPS: dict[str, Callable[..., Any]] = _StockOps()


# --------------------------------------------------------------------------- plugin


def enabled_by_env() -> bool:
    return os.environ.get(ENV_FLAG, "1").strip().lower() not in ("0", "false", "no", "off", "")


def is_active() -> bool:
    """True when this process's punica_cpu module currently uses the stacked ops."""
    import sys

    mod = sys.modules.get(TARGET_MODULE)
    return mod is not None and all(getattr(mod, n, None) is FAST_OPS[n] for n in OP_NAMES)


def _on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def register() -> bool:
    """vLLM general-plugin entry point. Returns True when the stacked ops are in place."""
    global _ACTIVE
    if not enabled_by_env():
        return False
    try:
        if not _on_cpu_platform():
            return False
        import importlib

        mod = importlib.import_module(TARGET_MODULE)
    except Exception:  # never break vLLM start-up because of the optimisation
        import logging

        logging.getLogger("vllm.tuneserve_cpu_lora").exception("tuneserve CPU LoRA ops not installed")
        return False
    if is_active():
        return True
    for name in OP_NAMES:
        current = getattr(mod, name)
        if current is not FAST_OPS[name]:
            _STOCK[name] = current
            _STOCK_OPS[name] = current
        setattr(mod, name, FAST_OPS[name])
    _ACTIVE = True
    from vllm.logger import init_logger

    init_logger("vllm.tuneserve_cpu_lora").info(
        "tuneserve CPU LoRA: stacked multi-LoRA ops active in %s (pid %d); %s=0 turns them off",
        TARGET_MODULE,
        os.getpid(),
        ENV_FLAG,
    )
    return True


def unregister() -> None:
    """Put the stock ops back (tests)."""
    global _ACTIVE
    import sys

    mod = sys.modules.get(TARGET_MODULE)
    if mod is not None:
        for name, fn in _STOCK.items():
            setattr(mod, name, fn)
    _ACTIVE = False
