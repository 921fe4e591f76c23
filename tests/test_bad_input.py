"""Bad input: every malformed call is refused before any kernel runs, with the error torch raises.

- Constructor arguments and calls to ``lstm_triton.LSTM`` / ``LSTMCell`` that ``torch.nn.LSTM`` / ``LSTMCell``
  refuse raise the same exception type with the same message, listed case by case and as Hypothesis-generated
  random valid configurations with one thing made wrong. Where torch leaks a backend error instead of a message
  about the call (an hx dtype other than the input's, a tensor on another device), ours raises the same type
  with a message naming the offending thing; two deviations are documented (an hx dtype mismatch gets a clear
  message, a packed input with an hx of another batch size is rejected instead of silently index-selected).
- The options beyond torch (``resets``, ``recurrent_dropout``, unknown keywords) are refused with a clear error.

All on the CPU, like torch's messages, which are those of its CPU backend (on a GPU machine, where the
interpreter is off, these exercise the module's own checks in front of torch's CPU LSTM). Launches are
intercepted: a kernel launched before the error fails the test.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstm_triton
from helpers import (DEVICE, F32, F64, MANY, assert_raises_before_any_kernel, assert_same_error, lstm_config,
                     module_pair, source_seed, valid_shapes)

# ----------------------------------------------------------------------------------------------------------------
# Constructor arguments and calls, case by case: torch's exception type and exact message, verbatim whatever the
# message (``backend_leaks={}``); launches are not intercepted here (``before_any_kernel=False``).


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((10, 20), dict(dropout=1.5)),
        ((10, 20), dict(dropout=True)),
        ((10, 20), dict(bias=1)),
        ((10, 20), dict(batch_first=1)),
        ((10.0, 20), dict()),
        ((0, 20), dict()),
        ((10, "20"), dict()),
        ((10, 0), dict()),
        ((10, 20), dict(num_layers=0)),
        ((10, 20), dict(num_layers=1.5)),
        ((10, 20), dict(proj_size=-1)),
        ((10, 20), dict(proj_size=20)),
        ((10, 20), dict(foo=1)),
    ],
    ids=lambda v: str(v),
)
def test_constructor_errors(args, kwargs):
    assert_same_error(lambda: lstm_triton.LSTM(*args, **kwargs), lambda: nn.LSTM(*args, **kwargs),
                      before_any_kernel=False, backend_leaks={})


def test_constructor_dropout_warning_and_positional_args():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        lstm_triton.LSTM(10, 20, 1, True, False, 0.5)
    m = lstm_triton.LSTM(10, 20, 2, False, True, 0.1, True, 5)
    assert repr(m) == repr(nn.LSTM(10, 20, 2, False, True, 0.1, True, 5))
    assert repr(m) == "LSTM(10, 20, proj_size=5, num_layers=2, bias=False, batch_first=True, dropout=0.1, bidirectional=True)"


FORWARD_ERRORS = {
    "4d-input": (dict(), lambda: (torch.randn(2, 3, 4, 10), None)),
    "1d-input": (dict(), lambda: (torch.randn(10), None)),
    "feature-size": (dict(), lambda: (torch.randn(5, 3, 11), None)),
    "3d-input-2d-hx": (dict(num_layers=2), lambda: (torch.randn(5, 3, 10), (torch.randn(2, 20), torch.randn(2, 20)))),
    "2d-input-3d-hx": (dict(num_layers=2), lambda: (torch.randn(5, 10), (torch.randn(2, 1, 20), torch.randn(2, 1, 20)))),
    "h0-shape": (dict(num_layers=2), lambda: (torch.randn(5, 3, 10), (torch.randn(2, 4, 20), torch.randn(2, 3, 20)))),
    "c0-shape": (dict(num_layers=2), lambda: (torch.randn(5, 3, 10), (torch.randn(2, 3, 20), torch.randn(2, 3, 21)))),
    "proj-h0": (dict(num_layers=2, proj_size=5, bidirectional=True),
                lambda: (torch.randn(5, 3, 10), (torch.randn(4, 3, 20), torch.randn(4, 3, 20)))),
    "batch-first-hx": (dict(num_layers=2, batch_first=True),
                       lambda: (torch.randn(3, 5, 10), (torch.randn(3, 2, 20), torch.randn(3, 2, 20)))),
    "input-dtype": (dict(), lambda: (torch.randn(5, 3, 10, dtype=F64), None)),
    "int-input": (dict(), lambda: (torch.ones(5, 3, 10, dtype=torch.int64), None)),
    "seq-len-0": (dict(), lambda: (torch.randn(0, 3, 10), None)),
    "device": (dict(), lambda: (torch.randn(5, 3, 10, device="meta"), None)),
}


@pytest.mark.parametrize("case", FORWARD_ERRORS, ids=str)
def test_forward_errors(case):
    kwargs, make = FORWARD_ERRORS[case]
    ours, ref = module_pair(10, 20, dtype=torch.float32, device="cpu", **kwargs)
    assert_same_error(lambda: ours(*make()), lambda: ref(*make()), before_any_kernel=False, backend_leaks={})


def test_hx_dtype_mismatch_gets_a_clear_error():
    ours = lstm_triton.LSTM(10, 20)
    with pytest.raises(RuntimeError, match=r"hx\[0\] dtype \(torch.float64\) does not match input dtype"):
        ours(torch.randn(5, 3, 10), (torch.randn(1, 3, 20, dtype=F64), torch.randn(1, 3, 20, dtype=F64)))


def test_packed_input_with_wrong_hx_batch_is_rejected():
    """torch silently index_selects such an hx; we say what is wrong (a documented deviation)."""
    ours = lstm_triton.LSTM(3, 5)
    packed = pack_sequence([torch.randn(2, 3), torch.randn(1, 3)])
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 5\), got \[1, 4, 5\]"):
        ours(packed, (torch.randn(1, 4, 5), torch.randn(1, 4, 5)))


CELL_ERRORS = {
    "3d-input": lambda: (torch.randn(2, 3, 10), None),
    "3d-hx": lambda: (torch.randn(3, 10), (torch.randn(1, 3, 20), torch.randn(1, 3, 20))),
    "feature-size": lambda: (torch.randn(3, 11), None),
    "batch": lambda: (torch.randn(3, 10), (torch.randn(4, 20), torch.randn(4, 20))),
    "hidden-size": lambda: (torch.randn(3, 10), (torch.randn(3, 21), torch.randn(3, 20))),
    "no-broadcast": lambda: (torch.randn(3, 10), (torch.randn(20), torch.randn(20))),
    "dtype": lambda: (torch.randn(3, 10, dtype=F64), None),
}


@pytest.mark.parametrize("case", CELL_ERRORS, ids=str)
def test_cell_errors(case):
    ours, ref = module_pair(10, 20, cell=True, dtype=torch.float32, device="cpu")
    assert_same_error(lambda: ours(*CELL_ERRORS[case]()), lambda: ref(*CELL_ERRORS[case]()),
                      before_any_kernel=False, backend_leaks={})


# ----------------------------------------------------------------------------------------------------------------
# Malformed calls (wrong types, ranks, sizes, dtypes, devices), case by case and as random valid configurations
# with one thing made wrong (Hypothesis): torch's error, and no kernel launched before it.


def _lstm_inputs():
    return torch.randn(5, 2, 3), torch.randn(2, 2, 4), torch.randn(2, 2, 4)


# (input, hx, ...) of malformed calls to an LSTM(3, 4, num_layers=2); each builds fresh tensors.
LSTM_MALFORMED = {
    "input-None": lambda x, h, c: (None,),
    "input-list": lambda x, h, c: (x.tolist(),),
    "input-ndarray": lambda x, h, c: (x.numpy(),),
    "input-int": lambda x, h, c: (3,),
    "hx-a-tensor": lambda x, h, c: (x, h),
    "hx-one-tensor-tuple": lambda x, h, c: (x, (h,)),
    "hx-three-tensor-tuple": lambda x, h, c: (x, (h, c, c)),
    "hx-None-h": lambda x, h, c: (x, (None, c)),
    "hx-None-c": lambda x, h, c: (x, (h, None)),
    "hx-ndarray": lambda x, h, c: (x, (h.numpy(), c.numpy())),
    "hx-on-meta": lambda x, h, c: (x, (h.to("meta"), c.to("meta"))),
    "c0-on-meta": lambda x, h, c: (x, (h, c.to("meta"))),
    "input-on-meta-with-hx": lambda x, h, c: (x.to("meta"), (h, c)),
    "empty-sequence-with-hx": lambda x, h, c: (x[:0], (h, c)),
    "empty-unbatched-sequence": lambda x, h, c: (x[:0, 0],),
    "feature-size-0": lambda x, h, c: (x[..., :0],),
    "bool-input": lambda x, h, c: (x > 0,),
    "complex-input": lambda x, h, c: (x.to(torch.complex64),),
    "int-hx": lambda x, h, c: (x, (h.long(), c.long())),
    "too-many-positional": lambda x, h, c: (x, (h, c), 1),
}


@pytest.mark.parametrize("case", LSTM_MALFORMED)
def test_malformed_lstm_call_raises_like_torch(case):
    ours, ref = module_pair(3, 4, num_layers=2, dtype=F32, device="cpu")
    make = LSTM_MALFORMED[case]
    assert_same_error(lambda: ours(*make(*_lstm_inputs())), lambda: ref(*make(*_lstm_inputs())))


# The same for an LSTMCell(3, 4).
CELL_MALFORMED = {
    "input-None": lambda x, h, c: (None,),
    "input-list": lambda x, h, c: (x.tolist(),),
    "hx-a-tensor": lambda x, h, c: (x, h),
    "hx-one-tensor-tuple": lambda x, h, c: (x, (h,)),
    "hx-three-tensor-tuple": lambda x, h, c: (x, (h, c, c)),
    "hx-None-c": lambda x, h, c: (x, (h, None)),
    "hx-on-meta": lambda x, h, c: (x, (h.to("meta"), c.to("meta"))),
    "input-on-meta": lambda x, h, c: (x.to("meta"),),
    "int-hx": lambda x, h, c: (x, (h.long(), c.long())),
    "float64-hx": lambda x, h, c: (x, (h.double(), c.double())),
    "0d-input": lambda x, h, c: (x[0, 0],),
    "bool-input": lambda x, h, c: (x > 0,),
}


@pytest.mark.parametrize("case", CELL_MALFORMED)
def test_malformed_cell_call_raises_like_torch(case):
    ours, ref = module_pair(3, 4, cell=True, dtype=F32, device="cpu")
    make = CELL_MALFORMED[case]
    inputs = lambda: (torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4))  # noqa: E731
    assert_same_error(lambda: ours(*make(*inputs())), lambda: ref(*make(*inputs())))


CORRUPTIONS = [
    "input-rank", "feature-size", "hx-rank", "h0-dim", "c0-dim", "input-dtype", "input-int",
    "empty-sequence", "input-device", "hx-device", "hx-dtype", "h0-c0-swapped",
]


@source_seed("59f6507e3a87b4a327ff1acbd8b2ea46ee16fc241ca6981bc750b18c3e30f7a507ca7a205a79210739aa080b19a8cafc")
@MANY
@given(config=lstm_config(), corruption=st.sampled_from(CORRUPTIONS), data=st.data())
def test_random_invalid_lstm_calls_raise_like_torch(config, corruption, data):
    """Random valid configurations, one thing made wrong: ours raises torch's exception (type and message), or
    a clear one where torch leaks a backend error, and no kernel runs."""
    I, H, kwargs, T, B = config
    xs, hs, cs = valid_shapes(I, H, kwargs, T, B)
    with_hx = data.draw(st.booleans(), "with_hx")
    x_dtype, hx_dtype, x_dev, hx_dev = F32, F32, "cpu", "cpu"
    if corruption == "input-rank":
        xs = data.draw(st.sampled_from([(), (I,), (1, 2, *xs) if B is None else (2, *xs)]), "rank")
    elif corruption == "feature-size":
        xs = (*xs[:-1], data.draw(st.integers(0, 6).filter(lambda n: n != I), "features"))
    elif corruption in ("hx-rank", "h0-dim", "c0-dim", "hx-dtype", "hx-device", "h0-c0-swapped"):
        with_hx = True
        if corruption == "hx-rank":
            hs, cs = ((hs[0], 1, *hs[1:]), (cs[0], 1, *cs[1:])) if B is None else (hs[:1] + hs[2:], cs[:1] + cs[2:])
        elif corruption in ("h0-dim", "c0-dim"):
            shape = list(hs if corruption == "h0-dim" else cs)
            dim = data.draw(st.integers(0, len(shape) - 1), "dim")
            shape[dim] = data.draw(st.integers(0, 20).filter(lambda n, old=shape[dim]: n != old), "size")
            hs, cs = (tuple(shape), cs) if corruption == "h0-dim" else (hs, tuple(shape))
        elif corruption == "h0-c0-swapped":
            if hs == cs:
                hs = cs = (*hs[:-1], hs[-1] + 1)  # both wrong in the same way
            else:
                hs, cs = cs, hs
        elif corruption == "hx-dtype":
            hx_dtype = data.draw(st.sampled_from([F64, torch.float16, torch.int64]), "hx_dtype")
        else:
            hx_dev = "meta"
    elif corruption == "input-dtype":
        x_dtype = data.draw(st.sampled_from([F64, torch.float16, torch.bfloat16]), "x_dtype")
    elif corruption == "input-int":
        x_dtype = data.draw(st.sampled_from([torch.int32, torch.int64, torch.bool]), "x_dtype")
    elif corruption == "empty-sequence":
        xs = (xs[0], 0, xs[2]) if kwargs["batch_first"] and B is not None else (0, *xs[1:])
    elif corruption == "input-device":
        x_dev = "meta"

    def make():
        x = torch.zeros(xs, device=x_dev).to(x_dtype)
        hx = None
        if with_hx:
            hx = tuple(torch.zeros(s, device=hx_dev).to(hx_dtype) for s in (hs, cs))
        return x, hx

    ours, ref = module_pair(I, H, dtype=F32, device="cpu", **kwargs)
    ref_raised = True
    try:
        ref(*make())
        ref_raised = False
    except Exception:
        pass
    assert ref_raised, "the corruption left a valid call (the strategy is wrong)"
    # An hx dtype other than the input's: torch's error comes from whichever backend runs (oneDNN, mkldnn,
    # cuDNN); ours is a documented, backend-independent message.
    own = r"hx\[[01]\] dtype \(.*\) does not match input dtype" if corruption == "hx-dtype" else None
    assert_same_error(lambda: ours(*make()), lambda: ref(*make()), ours_own=own)


CELL_CORRUPTIONS = ["input-rank", "feature-size", "hx-rank", "h-dim", "c-dim", "input-dtype", "input-device"]


@source_seed("67b0330f836636d43ce0748460ec86d105059af4215a47ef92d7f543c8ad30c42b51c24514d852b55b1544f017335647")
@MANY
@given(
    I=st.integers(1, 5), H=st.integers(1, 6), B=st.one_of(st.none(), st.integers(1, 4)),
    corruption=st.sampled_from(CELL_CORRUPTIONS), data=st.data(),
)
def test_random_invalid_cell_calls_raise_like_torch(I, H, B, corruption, data):
    xs, hs = ((I,), (H,)) if B is None else ((B, I), (B, H))
    cs = hs
    with_hx = data.draw(st.booleans(), "with_hx")
    x_dtype, x_dev = F32, "cpu"
    if corruption == "input-rank":
        xs = data.draw(st.sampled_from([(), (1, 2, *xs)] + ([(2, *xs)] if B is not None else [])), "rank")
    elif corruption == "feature-size":
        xs = (*xs[:-1], data.draw(st.integers(0, 7).filter(lambda n: n != I), "features"))
    elif corruption == "hx-rank":
        with_hx = True
        hs = cs = (1, *hs)
    elif corruption in ("h-dim", "c-dim"):
        with_hx = True
        shape = list(hs)
        dim = data.draw(st.integers(0, len(shape) - 1), "dim")
        shape[dim] = data.draw(st.integers(0, 9).filter(lambda n, old=shape[dim]: n != old), "size")
        hs, cs = (tuple(shape), cs) if corruption == "h-dim" else (hs, tuple(shape))
    elif corruption == "input-dtype":
        x_dtype = data.draw(st.sampled_from([F64, torch.float16, torch.int64]), "x_dtype")
    else:
        x_dev = "meta"

    def make():
        x = torch.zeros(xs, device=x_dev).to(x_dtype)
        return (x, tuple(torch.zeros(s) for s in (hs, cs))) if with_hx else (x,)

    ours, ref = module_pair(I, H, cell=True, dtype=F32, device="cpu")
    with pytest.raises(Exception):
        ref(*make())
    assert_same_error(lambda: ours(*make()), lambda: ref(*make()))


# ----------------------------------------------------------------------------------------------------------------
# The options beyond torch: a clear error before any kernel runs.

BAD_RESETS = {  # name: (module kwargs, input shape, resets factory, error type, message fragment)
    "transposed": (dict(), (5, 3, 2), lambda: torch.zeros(3, 5, dtype=torch.bool), ValueError,
                   r"\(sequence length, batch\) = \(5, 3\), got \(3, 5\)"),
    "broadcastable-row": (dict(), (5, 3, 2), lambda: torch.zeros(5, 1, dtype=torch.bool), ValueError,
                          r"\(5, 3\), got \(5, 1\)"),
    "with-feature-dim": (dict(), (5, 3, 2), lambda: torch.zeros(5, 3, 1, dtype=torch.bool), ValueError,
                         r"\(5, 3\), got \(5, 3, 1\)"),
    "one-dim": (dict(), (5, 3, 2), lambda: torch.zeros(5, dtype=torch.bool), ValueError, r"\(5, 3\), got \(5,\)"),
    "batch-first-seq-first": (dict(batch_first=True), (3, 5, 2), lambda: torch.zeros(5, 3, dtype=torch.bool),
                              ValueError, r"\(batch, sequence length\) with batch_first = \(3, 5\), got \(5, 3\)"),
    "unbatched-2d": (dict(), (5, 2), lambda: torch.zeros(5, 1, dtype=torch.bool), ValueError,
                     r"\(sequence length,\) = \(5,\), got \(5, 1\)"),
    "packed-flat": (dict(), "packed", lambda: torch.zeros(9, dtype=torch.bool), ValueError,
                    r"\(max sequence length, batch\) = \(4, 3\), got \(9,\)"),
    "packed-batch-first": (dict(batch_first=True), "packed", lambda: torch.zeros(3, 4, dtype=torch.bool), ValueError,
                           r"\(max sequence length, batch\) = \(4, 3\), got \(3, 4\)"),
    "float": (dict(), (5, 3, 2), lambda: torch.zeros(5, 3), TypeError, r"bool tensor, got dtype torch.float32"),
    "int": (dict(), (5, 3, 2), lambda: torch.zeros(5, 3, dtype=torch.int64), TypeError, r"bool.*torch.int64"),
    "uint8": (dict(), (5, 3, 2), lambda: torch.zeros(5, 3, dtype=torch.uint8), TypeError, r"bool.*torch.uint8"),
    "list": (dict(), (5, 3, 2), lambda: [[False] * 3] * 5, TypeError, r"bool tensor of shape .*got list"),
    "meta-device": (dict(), (5, 3, 2), lambda: torch.zeros(5, 3, dtype=torch.bool, device="meta"), RuntimeError,
                    r"resets must be on the input's device \(.*\), got a tensor on meta"),
}


@pytest.mark.parametrize("case", list(BAD_RESETS))
def test_bad_resets_raise_before_any_kernel(case):
    kwargs, shape, resets, error, match = BAD_RESETS[case]
    torch.manual_seed(0)
    ours = lstm_triton.LSTM(2, 4, **kwargs).to(DEVICE, F64)
    if shape == "packed":
        x = nn.utils.rnn.pack_sequence([torch.randn(n, 2, dtype=F64, device=DEVICE) for n in (2, 4, 3)],
                                       enforce_sorted=False)
    else:
        x = torch.randn(*shape, dtype=F64, device=DEVICE)
    r = resets()
    r = r.to(DEVICE) if isinstance(r, torch.Tensor) and r.device.type != "meta" else r
    assert_raises_before_any_kernel(lambda: ours(x, resets=r), error, match)


@pytest.mark.parametrize("p", [-0.1, 1.5, True, "0.5", float("nan")], ids=repr)
def test_bad_recurrent_dropout_is_refused_like_torchs_dropout(p):
    with pytest.raises(ValueError) as torch_error:
        nn.LSTM(2, 3, dropout=p)
    with pytest.raises(ValueError) as ours_error:
        lstm_triton.LSTM(2, 3, recurrent_dropout=p)
    assert str(ours_error.value) == str(torch_error.value).replace("dropout", "recurrent_dropout", 1)
    assert str(ours_error.value).startswith("recurrent_dropout should be a number in range [0, 1]")


def test_unknown_or_positional_keyword_raises_before_any_kernel():
    ours = lstm_triton.LSTM(2, 4).to(DEVICE, F64)
    x = torch.randn(5, 3, 2, dtype=F64, device=DEVICE)
    r = torch.zeros(5, 3, dtype=torch.bool, device=DEVICE)
    assert_raises_before_any_kernel(lambda: ours(x, reset=r), TypeError, "unexpected keyword argument 'reset'")
    assert_raises_before_any_kernel(lambda: ours(x, None, r), TypeError, "positional argument")
    with pytest.raises(TypeError, match="unexpected keyword argument 'recurrent_dropouts'"):
        lstm_triton.LSTM(2, 4, recurrent_dropouts=0.1)
