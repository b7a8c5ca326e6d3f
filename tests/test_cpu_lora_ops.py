"""The stacked CPU multi-LoRA ops (serving.lora_cpu_plugin) against vLLM's stock torch ops.

No vLLM engine is started here: the ops are called directly on random tensors, and once through
vLLM's real CPU punica wrapper (metadata from a LoRAMapping, as the model runner builds it).

Tolerances: in fp32 the stacked form is one GEMM over all slots in use where stock runs one
batched GEMV per token (einsum over gathered weights); the products are the same but the
summation order differs, so results agree to float rounding (allclose, rtol = atol = 1e-5 on
O(1) values), not bit for bit. Where no arithmetic is involved (rows without a LoRA when the op
overwrites, columns outside the slice) equality is exact. bf16 outputs are rounded to bf16 by both,
so they agree to about one bf16 ulp.

Index -1 ("no LoRA"): stock indexes ``weights[-1]`` and so applies the *last* slot to such
tokens; it is only right while that slot is empty. The stacked ops give those tokens nothing.
The reference for a -1 row is therefore stock run with the last slot zeroed, and for all other
rows stock run on the real weights.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

import torch
from vllm.lora.ops import torch_ops as stock
from vllm.lora.punica_wrapper.utils import compute_meta

from serving import lora_cpu_plugin as fast

ROOT = Path(__file__).resolve().parent.parent
SLOTS, RANK, HIDDEN = 4, 8, 64
SLICES = (64, 32, 32)  # a q/k/v-like split of one output
TOL: dict[torch.dtype, dict[str, Any]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2},
}


# --------------------------------------------------------------------------- batches

# (length, slot) per sequence; -1 = no LoRA. Slot SLOTS-1 (the last) is used by real tokens.
PREFILL = [(5, 0), (1, 2), (9, -1), (3, 3), (7, 0), (2, -1), (4, 1), (6, 3)]
DECODE = [(1, s) for s in (0, 3, -1, 1, 1, 2, -1, 0, 3, 2)]


def token_indices(seqs) -> torch.Tensor:
    return torch.tensor([slot for length, slot in seqs for _ in range(length)], dtype=torch.long)


def sgmv_meta(idx: torch.Tensor):
    """The (b_seq_start, seq_len, lora_indices, batches, max_len, token_nums) vLLM passes."""
    return compute_meta(idx)[:6]


def lora_a(dtype, seed=0, slots=SLOTS, out=RANK, inp=HIDDEN):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(slots, 1, out, inp, generator=g) * 0.2).to(dtype)


def lora_b(dtype, out, seed=1, slots=SLOTS, rank=RANK):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(slots, 1, out, rank, generator=g) * 0.2).to(dtype)


def last_slot_zeroed(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w[-1] = 0
    return w


def stock_reference(op, weights, idx, call):
    """Stock result with -1 rows meaning "no LoRA" (see the module docstring)."""
    full = call(op, weights)
    if not bool((idx < 0).any()):
        return full
    zeroed = call(op, last_slot_zeroed(weights))
    return torch.where((idx < 0).unsqueeze(1), zeroed, full)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOL[dtype])


def run_both(name, weights, idx, call):
    expected = stock_reference(getattr(stock, name), weights, idx, call)
    actual = call(getattr(fast, name), weights)
    return actual, expected


# --------------------------------------------------------------------------- op equality

CASES = [
    pytest.param("sgmv", PREFILL, id="prefill"),
    pytest.param("bgmv", DECODE, id="decode"),
    pytest.param("sgmv", PREFILL + DECODE, id="prefill+decode"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,seqs", CASES)
def test_shrink_matches_stock(kind, seqs, dtype):
    idx = token_indices(seqs)
    x = torch.randn(idx.numel(), HIDDEN, generator=torch.Generator().manual_seed(2)).to(dtype)
    a = lora_a(dtype)

    def call(op, w):
        y = torch.full((idx.numel(), RANK), 7.0)  # fp32 buffer, as the wrapper allocates
        if kind == "sgmv":
            op(x, w, y, *sgmv_meta(idx), 0.5)
        else:
            op(x, w, y, idx, 0.5)
        return y

    actual, expected = run_both(f"{kind}_shrink", a, idx, call)
    # Stock casts x and A to the fp32 buffer's dtype, so bf16 inputs are also computed in fp32.
    assert_close(actual, expected, torch.float32)
    assert torch.equal(actual[idx < 0], torch.zeros_like(actual[idx < 0]))  # exact: no LoRA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("kind,seqs", CASES)
@pytest.mark.parametrize("y_width", [HIDDEN + 3, HIDDEN - 5], ids=["y-wider", "y-narrower"])
def test_expand_matches_stock(kind, seqs, add_inputs, dtype, y_width):
    idx = token_indices(seqs)
    t = idx.numel()
    x = torch.randn(t, RANK, generator=torch.Generator().manual_seed(3))  # fp32 buffer
    b = lora_b(dtype, HIDDEN)
    y0 = torch.randn(t, y_width, generator=torch.Generator().manual_seed(4)).to(dtype)

    def call(op, w):
        y = y0.clone()
        if kind == "sgmv":
            op(x, w, y, *sgmv_meta(idx), add_inputs)
        else:
            op(x, w, y, idx, add_inputs)
        return y

    actual, expected = run_both(f"{kind}_expand", b, idx, call)
    assert_close(actual, expected, dtype)
    common = min(HIDDEN, y_width)
    assert torch.equal(actual[:, common:], y0[:, common:])  # exact: untouched padding
    no_lora = actual[idx < 0, :common]
    assert torch.equal(no_lora, y0[idx < 0, :common] if add_inputs else torch.zeros_like(no_lora))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("kind,seqs", CASES)
def test_expand_slice_matches_stock(kind, seqs, add_inputs, dtype):
    """Several slices at their offsets into one output, as PunicaWrapperCPU.add_expand does."""
    idx = token_indices(seqs)
    t = idx.numel()
    width = sum(SLICES) + 6  # columns past the last slice must stay untouched
    y0 = torch.randn(t, width, generator=torch.Generator().manual_seed(5)).to(dtype)
    xs = [torch.randn(t, RANK, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    bs = [lora_b(dtype, size, seed=20 + i) for i, size in enumerate(SLICES)]

    def run(op_for, weights):
        y = y0.clone()
        offset = 2
        for x, w, size in zip(xs, weights, SLICES, strict=False):
            if kind == "sgmv":
                op_for(x, w, y, *sgmv_meta(idx), offset, size, add_inputs)
            else:
                op_for(x, w, y, idx, offset, size, add_inputs)
            offset += size
        return y

    name = f"{kind}_expand_slice"
    full = run(getattr(stock, name), bs)
    zeroed = run(getattr(stock, name), [last_slot_zeroed(w) for w in bs])
    expected = torch.where((idx < 0).unsqueeze(1), zeroed, full)
    actual = run(getattr(fast, name), bs)
    assert_close(actual, expected, dtype)
    end = 2 + sum(SLICES)
    assert torch.equal(actual[:, :2], y0[:, :2]) and torch.equal(actual[:, end:], y0[:, end:])


def test_last_slot_in_use_and_no_lora_tokens():
    """-1 tokens next to tokens of the last slot: they get nothing (stock would apply that slot)."""
    idx = torch.tensor([3, -1, 3, -1, 0], dtype=torch.long)
    x = torch.randn(5, HIDDEN)
    a = lora_a(torch.float32)
    y = torch.zeros(5, RANK)
    fast.bgmv_shrink(x, a, y, idx, 1.0)
    assert torch.equal(y[idx < 0], torch.zeros(2, RANK))
    assert y[idx == 3].abs().sum() > 0
    ref = torch.zeros(5, RANK)
    stock.bgmv_shrink(x, a, ref, idx, 1.0)
    torch.testing.assert_close(y[idx >= 0], ref[idx >= 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "idx",
    [
        pytest.param([-1, -1, -1], id="all-no-lora"),
        pytest.param([2, 2, 2, 2], id="one-slot"),
        pytest.param([3, 2, 3, 3], id="high-slots-only"),
        pytest.param([1], id="one-token"),
        pytest.param([-1, 1, -1], id="one-slot-and-no-lora"),
    ],
)
@pytest.mark.parametrize("add_inputs", [True, False])
def test_special_batches(idx, add_inputs):
    idx = torch.tensor(idx, dtype=torch.long)
    t = idx.numel()
    x = torch.randn(t, HIDDEN)
    a, b = lora_a(torch.float32), lora_b(torch.float32, HIDDEN)
    buf = torch.randn(t, RANK)
    y0 = torch.randn(t, HIDDEN)

    def shrink(op, w):
        y = torch.full((t, RANK), 3.0)
        op(x, w, y, idx, 2.0)
        return y

    def expand(op, w):
        y = y0.clone()
        op(buf, w, y, idx, add_inputs)
        return y

    for name, w, call in (("bgmv_shrink", a, shrink), ("bgmv_expand", b, expand)):
        actual, expected = run_both(name, w, idx, call)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_unhandled_shapes_fall_back_to_stock():
    """One input row broadcast over many output rows is a stock quirk: delegated unchanged."""
    idx = torch.tensor([1], dtype=torch.long)
    b = lora_b(torch.float32, HIDDEN)
    buf = torch.randn(1, RANK)
    y1, y2 = torch.randn(4, HIDDEN), None
    y2 = y1.clone()
    stock.bgmv_expand(buf, b, y1, idx, True)
    fast.bgmv_expand(buf, b, y2, idx, True)
    assert torch.equal(y1, y2)


def test_weight_and_index_caches_follow_in_place_updates():
    """vLLM loads adapters into slots in place (set_lora/reset_lora) and reuses its index buffers."""
    b = lora_b(torch.float32, HIDDEN)
    buf = torch.randn(6, RANK)
    idx_buffer = torch.tensor([0, 1, 2, 3, 0, 1], dtype=torch.long)
    idx = idx_buffer[:6]

    def both():
        y1, y2 = torch.zeros(6, HIDDEN), torch.zeros(6, HIDDEN)
        stock.bgmv_expand(buf, b, y1, idx, True)
        fast.bgmv_expand(buf, b, y2, idx, True)
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)

    both()
    b[2, 0].copy_(torch.randn(HIDDEN, RANK))  # set_lora into slot 2
    both()
    b[1] = 0  # reset_lora of slot 1
    both()
    idx_buffer.copy_(torch.tensor([3, 3, 0, 2, 2, 1]))  # next step's mapping, same buffer
    both()


def test_inference_mode_tensors():
    """Weights created under torch.inference_mode() have no version counter: still correct."""
    idx = torch.tensor([0, 2, 3, 1], dtype=torch.long)
    with torch.inference_mode():
        b = lora_b(torch.float32, HIDDEN)
        buf = torch.randn(4, RANK)
        y1, y2 = torch.zeros(4, HIDDEN), torch.zeros(4, HIDDEN)
        stock.bgmv_expand(buf, b, y1, idx, True)
        fast.bgmv_expand(buf, b, y2, idx, True)
        b[1] = 0
        stock.bgmv_expand(buf, b, y1, idx, True)
        fast.bgmv_expand(buf, b, y2, idx, True)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- via the wrapper


def test_add_lora_linear_through_punica_cpu_wrapper(monkeypatch):
    """PunicaWrapperCPU.add_lora_linear (q/k/v slices) with the plugin registered == stock."""
    from vllm.lora.punica_wrapper import punica_cpu

    monkeypatch.setenv(fast.ENV_FLAG, "1")
    seqs = PREFILL + DECODE
    ids = [slot + 1 if slot >= 0 else 0 for length, slot in seqs for _ in range(length)]
    prompt_ids = [slot + 1 if slot >= 0 else 0 for _, slot in seqs]
    wrapper = punica_cpu.PunicaWrapperCPU(256, 32, device="cpu")
    # The fields of vllm.lora.layers.LoRAMapping that update_metadata reads (importing that
    # module pulls in the model executor: seconds for nothing here). The v1 model runner always
    # sets is_prefill=True, so vLLM 0.32 serves every step through the sgmv ops.
    mapping = SimpleNamespace(index_mapping=tuple(ids), prompt_mapping=tuple(prompt_ids), is_prefill=True)
    wrapper.update_metadata(mapping, [1, 2, 3, 4], SLOTS + 1, 1000)  # type: ignore[arg-type]  # duck-typed  # slot s holds LoRA id s+1
    t = len(ids)
    idx = token_indices(seqs)
    assert torch.equal(wrapper.token_lora_indices, idx)
    x = torch.randn(t, HIDDEN)
    a = tuple(lora_a(torch.float32, seed=30 + i) for i in range(3))
    b = tuple(lora_b(torch.float32, size, seed=40 + i) for i, size in enumerate(SLICES))
    y0 = torch.randn(t, sum(SLICES))

    def run(a, b):
        y = y0.clone()
        wrapper.add_lora_linear(y, x, a, b, 1.0, SLICES)
        return y

    fast.unregister()
    assert not fast.is_active()
    # stock reference; for the -1 tokens with the last slot emptied (see module docstring)
    expected = torch.where(
        (idx < 0).unsqueeze(1),
        run(tuple(map(last_slot_zeroed, a)), tuple(map(last_slot_zeroed, b))),
        run(a, b),
    )
    try:
        assert fast.register()
        assert fast.is_active()
        actual = run(a, b)
    finally:
        fast.unregister()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(actual, y0)


# --------------------------------------------------------------------------- plugin wiring


def test_register_patches_punica_cpu_and_logs(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    monkeypatch.setenv(fast.ENV_FLAG, "1")
    fast.unregister()
    originals = {n: getattr(punica_cpu, n) for n in fast.OP_NAMES}
    assert all(originals[n] is getattr(stock, n) for n in fast.OP_NAMES)
    logger = logging.getLogger("vllm.tuneserve_cpu_lora")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign, assignment]
    logger.addHandler(handler)  # vLLM's "vllm" logger does not propagate to the root
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert fast.register() is True
        for n in fast.OP_NAMES:
            assert getattr(punica_cpu, n) is fast.FAST_OPS[n]
        assert fast.register() is True  # idempotent: vLLM may load plugins more than once
        assert fast.is_active()
    finally:
        fast.unregister()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    for n in fast.OP_NAMES:
        assert getattr(punica_cpu, n) is originals[n]
    assert sum(fast.ENV_FLAG in r.getMessage() for r in records) == 1  # one line, not per call


def test_env_off_leaves_stock_in_place(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    fast.unregister()
    monkeypatch.setenv(fast.ENV_FLAG, "0")
    assert fast.register() is False
    assert not fast.is_active()
    for n in fast.OP_NAMES:
        assert getattr(punica_cpu, n) is getattr(stock, n)


def test_not_patched_off_cpu(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    fast.unregister()
    monkeypatch.setenv(fast.ENV_FLAG, "1")
    monkeypatch.setattr(fast, "_on_cpu_platform", lambda: False)
    assert fast.register() is False
    assert punica_cpu.bgmv_shrink is stock.bgmv_shrink  # type: ignore[attr-defined]  # vLLM imports it there


def test_entry_point_declared():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = data["project"]["entry-points"]["vllm.general_plugins"]
    assert eps["tuneserve_cpu_lora"] == "serving.lora_cpu_plugin:register"
    assert eps["tuneserve_lora_resolver"] == "serving.lora_resolver:register"
    from importlib.metadata import entry_points

    installed = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    if "tuneserve_cpu_lora" not in installed:
        pytest.skip("project not pip-installed in this interpreter: entry point not registered")
    assert installed["tuneserve_cpu_lora"] == "serving.lora_cpu_plugin:register"
    assert installed["tuneserve_lora_resolver"] == "serving.lora_resolver:register"
