"""Size limits and long sequences: 64-bit strides where offsets exceed 2³¹, refusal with the limit named where
they would overflow, and long sequences that stay finite and accurate.

Direction strides reach the kernels as Python ints (typed i64); a batch with B·4H ≥ 2³¹ (32-bit in-step row
offsets) is refused before any launch with an error naming the limit; a long float32 sequence with a growing
cell state matches the float64 reference. Checked on meta tensors with the launches recorded, not run, where
the sizes are large. Only meaningful on a GPU, and skipped without one: T = 10⁵ forward and backward, and a
batch beyond 32-bit row offsets actually run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import triton

import lstm_triton
from helpers import (CUDA, DEVICE, F32, F64, REPO, forward_backward, intercepted_launches, module_pair, needs_cuda,
                     random_cotangents, rel_err)
from lstm_triton import lstm_layer, lstm_reference
from lstm_triton.kernels import lstm_bwd, lstm_fwd, per_direction, plan_lstm


@pytest.mark.parametrize("path", ["persistent", "stepwise"])
def test_launchers_pass_direction_strides_as_64_bit_integers(path):
    """Per-direction strides T·B·4H, T·B·P and (T+1)·B·H exceed 2³¹ for long, wide problems. The launchers must
    hand them to Triton as Python ints (which Triton types as i64) with their exact values, so the kernels'
    ``d * stride`` is 64-bit; per-step strides (B·4H, B·P, B·H) are multiplied by a step index the kernels
    widen to 64 bits (``common.at``). Checked on meta tensors (no memory) with the launches recorded, not run."""
    # H within what each path takes (the persistent path holds every unit: H ≤ 64), T·B large enough
    D, T, B, H = (2, 2**14, 2**13, 2**4) if path == "persistent" else (2, 2**11, 2**11, 2**9)
    G = 4 * H
    expected = {"stride_gd": T * B * G, "stride_yd": T * B * H, "stride_cd": (T + 1) * B * H,
                "stride_gt": B * G, "stride_yt": B * H, "stride_ct": B * H}
    assert min(v for k, v in expected.items() if k.endswith("d")) >= 2**31
    meta = dict(device="meta", dtype=F32)
    plan = plan_lstm(B, H, F32, path=path)
    w_hh = per_direction([torch.empty(G, H, **meta), torch.empty(G, H, **meta)])
    with intercepted_launches() as calls:
        lstm_fwd(plan, torch.empty(D, T, B, G, **meta), w_hh, None, torch.empty(D, B, H, **meta),
                 torch.empty(D, B, H, **meta), save=True)
        lstm_bwd(plan, torch.empty(D, T, B, H, **meta), torch.empty(D, B, H, **meta), torch.empty(D, B, H, **meta),
                 None, torch.empty(D, T, B, G, **meta), torch.empty(D, T + 1, B, H, **meta), w_hh, None)
    assert calls, "no kernel was launched"
    kernels = {name for name, _ in calls}
    assert any("fwd" in k for k in kernels) and any("bwd" in k for k in kernels), kernels
    for name, args in calls:
        strides = {k: v for k, v in args.items() if k in expected}
        assert any(k.endswith("d") for k in strides), f"{name} gets no per-direction stride"
        for k, v in strides.items():
            assert type(v) is int, f"{name}.{k} is a {type(v).__name__}, not a Python int"
            assert v == expected[k], f"{name}.{k} = {v}, expected {expected[k]}"
            if k.endswith("d"):
                assert triton.runtime.jit.mangle_type(v) == "i64", (name, k)


LIMIT_MESSAGE = re.compile(r"2\^31|2\*\*31|2³¹|2147483647|2147483648|int32|32-bit|limit", re.IGNORECASE)


def test_batch_beyond_32_bit_row_offsets_is_refused_with_the_limit_named():
    """Within one step the kernels address batch row b, gate column j as b·4H + j in 32-bit arithmetic
    (``off_g = rb[:, None] * G + rg[None, :]`` and the per-step pointer increments ``B * G``). A problem with
    B·4H ≥ 2³¹ must therefore be refused, before any launch, with an error naming the limit — not launched
    into an illegal memory access. (Should the kernels move to 64-bit row offsets, the limit moves and this
    test follows.) Checked on meta tensors, at the public op and at the launcher."""
    B, H = 2**27 + 16, 4  # B·4H = 2³¹ + 256
    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(1, B, 1, **meta)
    w_ih, w_hh = torch.empty(4 * H, 1, **meta), torch.empty(4 * H, H, **meta)
    errors = []
    with intercepted_launches() as calls:
        for attempt in (
            lambda: lstm_layer(x, None, None, w_ih, w_hh),
            lambda: lstm_fwd(plan_lstm(B, H, torch.float16), torch.empty(1, 1, B, 4 * H, **meta),
                             per_direction([torch.empty(4 * H, H, **meta)]), None, torch.empty(1, B, H, **meta),
                             torch.empty(1, B, H, **meta)),
        ):
            try:
                attempt()
            except (RuntimeError, ValueError) as e:
                errors.append(e)
                break
    assert errors, (f"B·4H = {B * 4 * H} ≥ 2³¹ was accepted and launched ({[n for n, _ in calls]}) although the "
                    "kernels' in-step row offsets are 32-bit")
    assert LIMIT_MESSAGE.search(str(errors[0])), f"the error does not name the limit: {errors[0]!r}"
    assert not calls, "a kernel was launched before the error"


def test_long_sequence_stays_finite_and_matches_reference():
    """A long sequence through the persistent kernel (one launch walking T steps forward, then backward) in
    float32, with forget/input gates biased towards 1 so the cell state grows large: everything finite and
    within float32 accuracy of the float64 reference. On a GPU the same code runs T = 10⁵ below."""
    T = 2000 if CUDA else 512
    assert plan_lstm(2, 8, F32).path == "persistent"
    torch.manual_seed(0)
    m = lstm_triton.LSTM(3, 8).to(DEVICE)
    with torch.no_grad():
        m.bias_ih_l0[8:16] += 4.0  # forget gate
        m.bias_ih_l0[0:8] += 2.0  # input gate
        m.bias_ih_l0[16:24] += 1.0  # cell candidate
    x = torch.randn(T, 2, 3, device=DEVICE)
    xl = x.clone().requires_grad_()
    y, (h, c) = m(xl)
    cot = random_cotangents([y, h, c], seed=7)
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip((y, h, c), cot)), [xl, *m.parameters()])
    weights = [[w.detach().double().requires_grad_() for w in ws] for ws in m.all_weights]
    x64 = x.double().requires_grad_()
    y_r, (h_r, c_r) = lstm_reference(x64, None, weights)
    grads_r = torch.autograd.grad(sum((o * w.double()).sum() for o, w in zip((y_r, h_r, c_r), cot)),
                                  [x64, *weights[0]])
    assert c_r.abs().max() > 20  # the cell state did grow
    for name, a, r in zip(["y", "h_n", "c_n", "dx", "dw_ih", "dw_hh", "db_ih", "db_hh"],
                          [y, h, c, *grads], [y_r, h_r, c_r, *grads_r]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= 2e-5, (name, rel_err(a, r))


@needs_cuda
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_sequence_of_100k_steps_on_gpu(dtype):
    """T = 10⁵ forward and backward through the module, against torch.nn.LSTM in float64 on the same GPU."""
    T = 10**5
    ours, ref = module_pair(4, 32, dtype=F64, device="cuda")
    ours = ours.to(dtype)
    x = torch.randn(T, 4, 4, dtype=F64, device="cuda")
    build = lambda ls: (ls[0], None)  # noqa: E731
    outs, grads = forward_backward(ours, [x.to(dtype).requires_grad_()], build)
    outs_ref, grads_ref = forward_backward(ref, [x.clone().requires_grad_()], build)
    tol = 1e-10 if dtype == F64 else 5e-4  # float32: sums over 4·10⁵ rows in the weight-gradient GEMMs
    for name, a, r in zip(["y", "h_n", "c_n", "dx", "dw_ih", "dw_hh", "db_ih", "db_hh"], outs + grads,
                          outs_ref + grads_ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= tol, (name, rel_err(a, r))


BIG_BATCH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import lstm_triton
    from lstm_triton import lstm_reference

    B, H = 2**27 + 16, 4  # B·4H = 2³¹ + 256
    torch.manual_seed(0)
    m = lstm_triton.LSTM(1, H).to(device="cuda", dtype=torch.bfloat16)
    try:
        x = torch.randn(2, B, 1, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y, (h, c) = m(x)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        print(json.dumps({"status": "oom"}))
        sys.exit(0)
    except (RuntimeError, ValueError) as e:
        if "illegal memory access" in str(e) or "CUDA error" in str(e):
            raise
        print(json.dumps({"status": "refused", "message": str(e)}))
        sys.exit(0)
    rows = torch.cat([torch.arange(16), torch.arange(B - 32, B)]).cuda()
    w = [[t.detach().double() for t in ws] for ws in m.all_weights]
    y_r, (h_r, c_r) = lstm_reference(x[:, rows].double(), None, w)
    err = lambda a, r: ((a.double() - r).abs().max() / r.abs().max().clamp(min=1.0)).item()
    print(json.dumps({"status": "ran", "err_y": err(y[:, rows], y_r), "err_c": err(c[0, rows], c_r[0])}))
    """
)


@needs_cuda
def test_batch_beyond_32_bit_row_offsets_on_gpu(tmp_path):
    """B·4H > 2³¹ on a real GPU: either refused with an error naming the limit, or correct results in the rows
    past 2³¹ — never an illegal memory access (which would also poison this process's CUDA context, hence the
    separate process) nor silently wrong rows."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", BIG_BATCH_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"the run crashed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["status"] == "oom":
        pytest.skip("not enough GPU memory for the problem")
    if result["status"] == "refused":
        assert LIMIT_MESSAGE.search(result["message"]), f"the error does not name the limit: {result['message']}"
    else:
        assert result["err_y"] <= 2e-2 and result["err_c"] <= 2e-2, result
