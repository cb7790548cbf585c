"""Model FLOPs of a training step (MFU's numerator) and the bf16 peak of known GPUs (its denominator)."""
from __future__ import annotations

# Dense bf16 peak FLOP/s per device (no sparsity), matched by substring of torch.cuda.get_device_name().
BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "B200": 2250e12,
}


def device_peak_flops(device_name: str | None) -> float | None:
    """bf16 dense peak of a GPU by name (None when unknown or on CPU)."""
    if not device_name:
        return None
    for key, value in BF16_PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def flop_coefficients(hf_config: dict) -> tuple[float, float]:
    """(a, b) of a training step's model FLOPs a*tokens + b*sum(s^2) over segments of s real tokens (forward +
    backward = 3x forward): `a` the per-token matmuls, `b` causal attention.

    Causal attention counts s^2/2 score entries per segment, for QK^T and for AV, at 2 FLOPs per multiply-add.
    """
    from megapack.model.config import head_dim, num_kv_heads

    h = hf_config["hidden_size"]
    layers = hf_config["num_hidden_layers"]
    heads = hf_config["num_attention_heads"]
    kv_heads, d = num_kv_heads(hf_config), head_dim(hf_config)
    ffn = hf_config["intermediate_size"]
    vocab = hf_config["vocab_size"]
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * ffn
    matmul_params = layers * per_layer + h * vocab
    return 3.0 * 2.0 * matmul_params, 3.0 * 2.0 * layers * heads * d


def model_flops(hf_config: dict, tokens: int, seq_sq_sum: int) -> float:
    """Model FLOPs of training (forward + backward = 3x forward) on `tokens` real tokens in segments whose squared
    lengths sum to `seq_sq_sum` (coefficients: `flop_coefficients`).

    Only real tokens count (padding is computed but is not model work, so padding shows up as lower MFU).
    """
    a, b = flop_coefficients(hf_config)
    return a * tokens + b * float(seq_sq_sum)
