"""GPU attention backends (te, flash, torch_varlen): packed == alone and agreement with SDPA. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from model_helpers import make_hf_checkpoint, packed_example

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU attention backends need CUDA")]


@pytest.fixture(scope="module")
def dist_env():
    from megapack.training.run.distributed import destroy_distributed, init_distributed

    env = init_distributed(tp=1, pp=1)
    yield env
    destroy_distributed()


def _available() -> list[str]:
    if not torch.cuda.is_available():
        return []
    from megapack.model.attention import flash_available, torch_varlen_available
    from megapack.model.spec import te_available

    checks = {"te": te_available, "flash": flash_available, "torch_varlen": torch_varlen_available}
    return [name for name, ok in checks.items() if ok()]


@pytest.mark.parametrize("backend", ["te", "flash", "torch_varlen"])
def test_gpu_backend_packed_equals_alone_and_matches_sdpa(tmp_path, dist_env, backend):
    if backend not in _available():
        pytest.skip(f"{backend} is not installed here")
    from megatron.core.packed_seq_params import PackedSeqParams

    from megapack.model.builder import build_model
    from megapack.model.config import load_hf_config
    from megapack.model.hf_import import load_hf_weights

    hf = make_hf_checkpoint(tmp_path / "hf", num_layers=2)
    cfg = load_hf_config(hf)
    convs, tokens, positions, cu = packed_example()
    tokens, positions, cu = tokens.cuda(), positions.cuda(), cu.cuda()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)
    outputs = {}
    for name in (backend, "sdpa"):
        model = build_model(cfg, attention_backend=name, bf16=True, seq_length=64).eval()
        load_hf_weights(model, hf)
        with torch.no_grad():
            packed = model(input_ids=tokens, position_ids=positions, attention_mask=None, packed_seq_params=params)
            alone = [model(input_ids=c[None].cuda(), position_ids=torch.arange(len(c), device="cuda")[None],
                           attention_mask=None) for c in convs]
        outputs[name] = packed.float()[..., :300]
        start = 0
        for conv, single in zip(convs, alone):
            diff = (packed[0, start : start + len(conv), :300] - single[0, :, :300]).float().abs().max()
            assert diff <= 5e-2, (name, float(diff))
            start += len(conv)
    scale = outputs["sdpa"].abs().max()
    assert (outputs[backend] - outputs["sdpa"]).abs().max() / scale <= 2e-2
