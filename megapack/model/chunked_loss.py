"""The output layer and vocabulary-parallel cross-entropy, a chunk of tokens at a time: never the full logits.

megatron-core's loss materialises the logits of every token of a micro-batch (4,096 tokens × 128,256 entries is
2.1 GB in fp32 at TP1) and its softmax gradient as large again. Here the forward computes, per chunk of tokens, the
chunk's logits on this rank's vocabulary shard, its log-sum-exp (max and sum reduced over TP as megatron does) and
the loss, and keeps only the per-token log-sum-exp; the backward recomputes each chunk's logits, forms
softmax − one-hot scaled by the incoming gradient, and accumulates the gradients of the hidden states and of the
output weight (into megatron's fp32 main gradient when the weight is not tied to the embedding). Cost: one extra output-layer matmul per step (the recomputation), about 2% of LLaMA-3-8B's FLOPs at 4K.
The arithmetic per token is megatron's own (`VocabParallelCrossEntropy`): the same losses and gradients up to
summation order. Padded vocabulary columns get the lowest finite logit, as `MegapackGPTModel` does for full logits.
A row no longer than one chunk takes megatron's loss (`MegapackGPTModel._postprocess`): chunking would only add the
recomputation.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as _CE
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
)


def _shard_logits(hidden: torch.Tensor, weight: torch.Tensor, valid_columns: int) -> torch.Tensor:
    """A chunk's logits on this rank's vocabulary shard, in the model's dtype, padded columns at the lowest value."""
    logits = torch.matmul(hidden, weight.t())
    if valid_columns < logits.shape[-1]:
        logits[:, max(valid_columns, 0):] = torch.finfo(logits.dtype).min
    return logits


def _chunk_forward(hidden, weight, target, vocab_start: int, valid_columns: int, group):
    """(losses, log-sum-exp) of one chunk; its logits die on return (a loop variable would keep two chunks alive)."""
    logits, logits_max = _CE.calculate_logits_max(_shard_logits(hidden, weight, valid_columns))
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    _, _, predicted, sum_exp, _ = _CE.calculate_predicted_logits(
        logits, target, logits_max, vocab_start, vocab_start + weight.shape[0])
    dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
    log_sum = torch.log(sum_exp)
    return log_sum - predicted, logits_max + log_sum


def _chunk_backward(hidden, weight, lse, local, on_shard, grad_losses, valid_columns: int, grad_weight) -> torch.Tensor:
    """The hidden-state gradient of one chunk; adds its output-weight gradient into the fp32 `grad_weight`."""
    softmax = _shard_logits(hidden, weight, valid_columns).float()
    softmax.sub_(lse[:, None]).exp_()  # in place: one fp32 chunk (plus its model-dtype logits while converting)
    rows = torch.nonzero(on_shard).squeeze(1)
    softmax[rows, local[rows]] -= 1.0
    softmax.mul_(grad_losses[:, None])
    grad = softmax.to(hidden.dtype)
    grad_weight.add_(torch.matmul(grad.t(), hidden))
    return torch.matmul(grad, weight)


class _ChunkedVocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy of hidden [N, h] against a vocabulary shard weight [V/TP, h], chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, vocab_start: int, valid_columns: int, group, tied: bool):
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            losses[start:end], lse[start:end] = _chunk_forward(hidden[start:end], weight, target[start:end],
                                                               vocab_start, valid_columns, group)
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk, ctx.vocab_start, ctx.valid_columns, ctx.tied = chunk, vocab_start, valid_columns, tied
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, target, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        # megatron's DDP gives each parameter an fp32 `main_grad`: add into it (as gradient-accumulation fusion
        # does) unless the weight is tied to the embedding, whose own gradient arrives through `.grad`
        into_main_grad = hasattr(weight, "main_grad") and not ctx.tied
        grad_weight = weight.main_grad if into_main_grad else torch.zeros(weight.shape, dtype=torch.float32,
                                                                            device=weight.device)
        local = target - ctx.vocab_start
        on_shard = (local >= 0) & (local < weight.shape[0])
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            grad_hidden[start:end] = _chunk_backward(
                hidden[start:end], weight, lse[start:end], local[start:end], on_shard[start:end],
                grad_losses[start:end], ctx.valid_columns, grad_weight)
        if into_main_grad:  # a placeholder gradient still fires DDP's hook, which skips it by this flag
            weight.grad_added_to_main_grad = True
            return grad_hidden, torch.empty_like(weight), None, None, None, None, None, None
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                    true_vocab_size: int, sequence_parallel: bool, tied: bool) -> torch.Tensor:
    """Per-token losses [b, s] of hidden states [s, b, h] (this rank's sequence share under sequence parallelism)
    against `labels` [b, s], through the output weight shard [V/TP, h] (megatron's `compute_language_model_loss`)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if sequence_parallel:  # all-gather the sequence forward, reduce-scatter its gradient backward
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=group)
    else:  # identity forward, all-reduce of the (vocabulary-partial) gradient backward
        hidden = copy_to_tensor_model_parallel_region(hidden, group=group)
    s, b, h = hidden.shape
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    losses = _ChunkedVocabParallelCE.apply(
        hidden.reshape(s * b, h), weight, labels.transpose(0, 1).reshape(s * b), max(int(chunk_tokens), 1),
        vocab_start, true_vocab_size - vocab_start, group, tied)
    return losses.view(s, b).transpose(0, 1).contiguous()
