"""bf16 GPU parity: jaxgpt (bf16 compute, fp32 params) vs torch_ref under bf16 autocast on CUDA.

Both sides start from identical fp32 weights. Errors are relative RMS (||a-b|| / ||b||) against torch_ref;
each side's distance to an fp32 torch reference is reported too, to show how much of the gap is bf16 itself.
Run on the device: `pytest -m gpu parity_tests`.
"""

import json
import os

import numpy as np
import pytest
import torch

from jaxgpt.config import ModelConfig
from parity_tests.helpers import VARIANTS, jax_grads, random_batch, rel_err, twin_models, variant_config

FWD_TOL = 4e-3  # FLA's forward threshold
GRAD_TOL = 8e-3  # FLA's gradient threshold
GPU_BASE = ModelConfig(n_layer=2, n_head=12, n_embd=768, block_size=1024, dtype="bfloat16")


def torch_outputs(model, idx, targets, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(idx)
        loss = model.loss(idx, targets)
    loss.backward()
    grads = {n: p.grad.float().cpu().numpy() for n, p in model.named_parameters()}
    return logits.float().detach().cpu().numpy(), loss.item(), grads


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_parity_with_torch_ref(variant):
    cfg = variant_config(variant, base=GPU_BASE).model
    jmodel, tmodel = twin_models(cfg, seed=0, device="cuda")
    idx, targets = random_batch(cfg, batch=4, seed=1)
    t_idx, t_tgt = (torch.from_numpy(a).long().cuda() for a in (idx, targets))

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref_logits, ref_loss, ref_grads = torch_outputs(tmodel, t_idx, t_tgt, autocast=False)  # fp32 reference
    t_logits, t_loss, t_grads = torch_outputs(tmodel, t_idx, t_tgt, autocast=True)
    j_logits = np.asarray(jmodel(idx), np.float32)
    j_loss, j_grads = jax_grads(jmodel, idx, targets)

    report = {
        "variant": variant,
        "logits": {"jax_vs_torch": rel_err(j_logits, t_logits), "jax_vs_fp32": rel_err(j_logits, ref_logits),
                   "torch_vs_fp32": rel_err(t_logits, ref_logits)},
        "loss": {"jax": j_loss, "torch": t_loss, "fp32": ref_loss},
        "grads_jax_vs_torch": {n: rel_err(j_grads[n], t_grads[n]) for n in t_grads},
        "grads_torch_vs_fp32": {n: rel_err(t_grads[n], ref_grads[n]) for n in t_grads},
    }
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"gpu_parity_{variant}.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("grads")}, indent=1))
    worst = max(report["grads_jax_vs_torch"], key=report["grads_jax_vs_torch"].get)
    print(f"worst grad: {worst} {report['grads_jax_vs_torch'][worst]:.2e}")

    assert report["logits"]["jax_vs_torch"] < FWD_TOL
    assert abs(j_loss - t_loss) / t_loss < FWD_TOL
    assert report["grads_jax_vs_torch"][worst] < GRAD_TOL, worst
