"""Build megatron-core's GPTModel for a Hugging Face LLaMA config on the current tensor/pipeline position."""
from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from megapack.errors import MegapackError
from megapack.model.config import DEFAULT_LOSS_CHUNK_TOKENS, head_dim, rope_parameters, transformer_config_from_hf
from megapack.model.spec import CONCRETE_BACKENDS, gpt_block_spec

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary size rounded up to a multiple of 128 x TP (the embedding/output rows megatron allocates)."""
    multiple = VOCAB_PAD_MULTIPLE * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def as_chunks(model) -> list:
    """A rank's model as the list of its virtual-pipeline chunks (megatron's convention: a module or a list)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def llama3_inv_freq(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """RoPE inverse frequencies with LLaMA-3.1 scaling, using every parameter from config.json (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class MegapackGPTModel(GPTModel):
    """GPTModel that gathers logits across TP when no labels are given, hides the vocabulary padding, and computes
    the training loss `loss_chunk_tokens` tokens at a time (megapack.model.chunked_loss; 0: megatron's own loss)."""

    def __init__(self, *args: Any, true_vocab_size: int, loss_chunk_tokens: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.true_vocab_size = true_vocab_size
        self.loss_chunk_tokens = loss_chunk_tokens
        if self.post_process and true_vocab_size < self.vocab_size:
            self.output_layer.register_forward_hook(self._mask_vocab_padding)

    def _mask_vocab_padding(self, _module, _inputs, output):
        """Padded vocabulary columns get the lowest finite logit so softmax, loss and argmax never see them."""
        from megatron.core import parallel_state

        logits, bias = output
        width = logits.shape[-1]
        start = 0 if width == self.vocab_size else parallel_state.get_tensor_model_parallel_rank() * width
        cut = self.true_vocab_size - start
        if cut >= width:
            return output
        keep = torch.arange(width, device=logits.device) < cut
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min), bias

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args: Any, **kwargs: Any):
        """megatron's postprocess; the chunked loss instead when labels are given and the row is longer than a chunk
        (one chunk would recompute the logits in the backward for nothing)."""
        chunked = labels is not None and self.post_process and self.loss_chunk_tokens > 0
        sp = chunked and self.output_layer.sequence_parallel
        tokens = hidden_states.shape[0] * hidden_states.shape[1] * (self.config.tensor_model_parallel_size if sp else 1)
        if (not chunked or tokens <= self.loss_chunk_tokens or self.config.mtp_num_layers
                or kwargs.get("mtp_in_postprocess")):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        from megapack.model.chunked_loss import chunked_lm_loss

        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        weight = self.output_layer.weight if weight is None else weight
        return chunked_lm_loss(hidden_states, weight, labels, self.loss_chunk_tokens, self.true_vocab_size,
                               sp, self.share_embeddings_and_output_weights)

    def forward(self, input_ids, position_ids, attention_mask, *args: Any, labels=None, runtime_gather_output=None,
                **kwargs: Any):
        """GPTModel.forward; without labels the logits come back gathered over TP ([b, t, padded vocab])."""
        if labels is None and runtime_gather_output is None:
            runtime_gather_output = True
        return super().forward(
            input_ids, position_ids, attention_mask, *args, labels=labels,
            runtime_gather_output=runtime_gather_output, **kwargs,
        )


def build_model(
    hf_config: dict,
    *,
    attention_backend: str = "sdpa",
    cross_sample_attention: bool = False,
    seq_length: int = 4096,
    vp_stage: int | None = None,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    **config_kwargs: Any,
) -> GPTModel:
    """A GPTModel for this rank's pipeline stage (pre/post process from parallel_state), vocab padded to 128 x TP;
    `config_kwargs` go to `transformer_config_from_hf` (bf16, sequence_parallel, recompute, TransformerConfig
    fields); the training loss runs `loss_chunk_tokens` tokens at a time (0: megatron's loss over full logits)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise MegapackError("build_model needs megatron's parallel state: call init_distributed() first")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config_kwargs.setdefault("context_parallel_size", parallel_state.get_context_parallel_world_size())
    if attention_backend not in CONCRETE_BACKENDS:  # `auto` is resolved once, by the run plan
        raise MegapackError(f"attention_backend {attention_backend!r}: build_model takes a resolved backend "
                            f"({', '.join(CONCRETE_BACKENDS)}); see megapack.model.spec.resolve_attention_backend")
    config = transformer_config_from_hf(hf_config, attention_backend=attention_backend, tp=tp, pp=pp, **config_kwargs)
    theta, scaling = rope_parameters(hf_config)
    vocab = int(hf_config["vocab_size"])
    model = MegapackGPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, attention_backend, cross_sample_attention, vp_stage),
        vocab_size=padded_vocab_size(vocab, tp),
        true_vocab_size=vocab,
        loss_chunk_tokens=loss_chunk_tokens,
        max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf_config.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=theta,
        rope_scaling=scaling is not None,
        rope_scaling_factor=float(scaling["factor"]) if scaling else 8.0,
        vp_stage=vp_stage,
    )
    # megatron's llama3 scaling hard-codes low/high/original lengths; recompute from config.json instead (on the
    # CPU: under a `torch.device("meta")` build, megatron's inv_freq buffer still lives on the CPU)
    with torch.device("cpu"):
        inv_freq = llama3_inv_freq(head_dim(hf_config), theta, scaling)
    model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
    on_meta = any(p.is_meta for p in model.parameters())  # the memory planner's parameter-free build
    if torch.cuda.is_available() and not on_meta:
        model = model.cuda(torch.cuda.current_device())
    return model
