"""A fix for megatron-core 0.16.1's shape exchange of variable-length pipeline micro-batches under interleaving.

With `variable_seq_lengths` every pipeline p2p call first exchanges the shapes of the tensors it sends
(`P2PCommunicator._communicate_shapes`), posting in one batch: send to prev, receive from prev, send to next, receive
from next. With two pipeline ranks, prev and next are the same peer, and messages between a pair are matched in the
order they were posted: when one call sends both ways (interleaved 1F1B's steady state: an activation forward and a
gradient backward) the peer's "receive from prev" gets the gradient's shape and its "receive from next" the
activation's, and the tensors that follow have the wrong sizes (gloo: "Received data size doesn't match expected
size"; NCCL would read garbage). The replacement posts the same operations in the order megatron's own unbatched
`_p2p_ops` uses for the tensors themselves: even ranks send-next, receive-prev, send-prev, receive-next; odd ranks
receive-prev, send-next, receive-next, send-prev, so each message meets the receive meant for it. Installed by the
trainer for runs with virtual pipeline stages (where megatron also gets `batch_p2p_comm=False`, the unbatched
tensor path).
"""
from __future__ import annotations


def _ordered_shape_exchange(self, tensor_send_next, tensor_send_prev, recv_prev: bool, recv_next: bool):
    import torch
    import torch.distributed as dist

    device = torch.cuda.current_device()

    def shape(tensor):
        return None if tensor is None else torch.tensor(tensor.size(), device=device, dtype=torch.int64)

    recv_prev_shape = torch.empty((3,), device=device, dtype=torch.int64) if recv_prev else None
    recv_next_shape = torch.empty((3,), device=device, dtype=torch.int64) if recv_next else None
    send_next = (dist.isend, shape(tensor_send_next), self.next_rank)
    send_prev = (dist.isend, shape(tensor_send_prev), self.prev_rank)
    get_prev = (dist.irecv, recv_prev_shape, self.prev_rank)
    get_next = (dist.irecv, recv_next_shape, self.next_rank)
    order = (send_next, get_prev, send_prev, get_next) if self.pp_group.rank() % 2 == 0 \
        else (get_prev, send_next, get_next, send_prev)
    requests = [op(tensor, peer, group=self.pp_group) for op, tensor, peer in order if tensor is not None]
    for request in requests:
        request.wait()
    return (recv_prev_shape.tolist() if recv_prev else [0, 0, 0],
            recv_next_shape.tolist() if recv_next else [0, 0, 0])


def install_ordered_shape_exchange() -> None:
    """Replace megatron's P2PCommunicator._communicate_shapes by the ordered exchange (idempotent)."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    P2PCommunicator._communicate_shapes = _ordered_shape_exchange
