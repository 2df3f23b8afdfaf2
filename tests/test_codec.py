"""The tensor codec: exact round trips per wire dtype, and every malformed frame refused."""

import pytest
import torch

from tpi_node.comm.codec import FrameError, from_pb, to_pb
from tpi_node.proto import tpi_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact_in_the_wire_dtype(dtype):
    t = torch.randn(7, 576)
    msg = pb.Tensor.FromString(to_pb(t, dtype).SerializeToString())  # through real bytes
    back = from_pb(msg, (7, 576))
    assert back.dtype == dtype and back.shape == (7, 576)
    assert torch.equal(back, t.to(dtype))
    assert len(msg.data) == 7 * 576 * dtype.itemsize


def test_decoded_tensor_is_writable_and_independent():
    msg = to_pb(torch.ones(2, 3))
    back = from_pb(msg)
    back += 1
    assert torch.equal(from_pb(msg), torch.ones(2, 3))


def test_empty_and_scalar_shapes():
    assert from_pb(to_pb(torch.empty(0, 4))).shape == (0, 4)
    assert from_pb(to_pb(torch.tensor(3.5))).item() == 3.5


def _frame(**kw):
    m = to_pb(torch.randn(2, 4))
    for k, v in kw.items():
        if k == "shape":
            m.shape[:] = v
        else:
            setattr(m, k, v)
    return m


@pytest.mark.parametrize(
    "frame, expect, words",
    [
        (dict(dtype=9), None, "unknown dtype"),
        (dict(data=b"\0" * 31), None, "31 bytes for shape [2, 4]"),
        (dict(shape=[2, 5]), None, "bytes for shape [2, 5]"),
        (dict(shape=[-1, 4]), None, "bad shape"),
        (dict(shape=[1, 1, 1, 1, 2]), None, "bad shape"),
        (dict(shape=[1 << 20, 1 << 20]), None, "over the"),
        (dict(), (4, 2), "where [4, 2] was expected"),
    ],
)
def test_malformed_frames_are_refused_with_a_message(frame, expect, words):
    with pytest.raises(FrameError) as e:
        from_pb(_frame(**frame), expect, what="partial")
    assert words in str(e.value) and str(e.value).startswith("partial:")


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported wire dtype"):
        to_pb(torch.zeros(2, dtype=torch.int64))
