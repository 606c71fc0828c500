"""Numbers both twins use: initialisation, the embedding variants' tables, norm epsilons, FLA layer options and
the loss variants' weights and caps (docs/variants.md describes the variants)."""

import math

# Effective initialisation: every nn.Linear / nn.Embedding weight is re-drawn N(0, INIT_STD) after construction.
INIT_STD = 0.02

# Norms.
LAYER_NORM_EPS = 1e-5  # the `layernorm` blocks
RMS_NORM_EPS = 1e-6  # the `rmsnorm*` blocks and final norm
FLA_NORM_EPS = 1e-5  # FLA's per-head output norms (norm_eps)
L2_NORM_EPS = 1e-6  # FLA's in-kernel L2 norm of DeltaNet's q and k, inside the sqrt
PARALLEL_GATE_INIT = 1 / math.sqrt(2)  # `rmsnorm_parallel_gated`: attn_gate and mlp_gate

# Embeddings.
HASH_CUR, HASH_PREV = 36313, 27191  # `bigram_hash`: multipliers of the current and the previous token
NUM_TABLES = 5  # extra tables (in units of vocab_size) of bigram_hash and of the value embeddings
BIGRAM_LAMBDA_INIT = 0.1  # per-layer scale of the bigram table
VE_LAMBDA_INIT = 0.5  # per-table scale of a value embedding
VE_BETA_INIT = 0.1  # per-table scale of the local context residual (ve_lcr*)

# FLA layer options of the linear mixers.
CONV_SIZE = 4  # short convolutions
GATE_LOW_RANK_DIM = 16  # GLA's low-rank forget gate
GATE_LOGIT_NORMALIZER = 16  # GLA: log-gate = logsigmoid(gk) / 16
GDN_A_INIT_MAX = 16.0  # Gated DeltaNet's A_log = log(A), A ~ U(0, 16) (FLA's init)
GDN_DT_MIN, GDN_DT_MAX, GDN_DT_INIT_FLOOR = 1e-3, 0.1, 1e-4  # its dt_bias = softplus^-1(dt), log-uniform dt >= floor
RETENTION_DECAY_OFFSET = 5  # RetNet: head h keeps 1 - 2^-(RETENTION_DECAY_OFFSET + h) of its state per step
ROPE_THETA = 10000.0  # RetNet: FLA's RotaryEmbedding base
MAMBA2_EXPAND = 2  # Mamba2: inner width expand * C, split into H heads of expand * C / H
MAMBA2_STATE_SIZE = 128  # Mamba2: SSM state size N (one group: B and C [N] shared by all heads)
MAMBA2_CONV_KERNEL = 4  # Mamba2: the causal depthwise conv over x, B, C (with bias, SiLU)
MAMBA2_A_INIT_RANGE = (1.0, 16.0)  # Mamba2: A_log = log(A), A ~ U(1, 16); its dt_bias draws as Gated DeltaNet's
MAMBA2_DT_LIMIT = (0.0, math.inf)  # Mamba2: dt = softplus(.) clamped to this range


def retention_log_decays(num_heads: int) -> list[float]:
    """RetNet's fixed per-head log-decays log(1 - 2^(-5 - h)), h = 0 .. num_heads - 1 (FLA's chunk_retention)."""
    return [math.log1p(-2.0 ** -(RETENTION_DECAY_OFFSET + h)) for h in range(num_heads)]

# Losses.
Z_WEIGHT = 1e-4  # z-loss: Z_WEIGHT * mean(logsumexp(logits)^2)
LABEL_SMOOTHING = 0.05  # label_smoothing and poly_ls_z
TANH_CAP_SMOOTHING = 0.1  # tanh_cap_ls_z
LOGIT_CAP = 30.0  # softcap_ce: LOGIT_CAP * sigmoid(z / SIGMOID_CAP_SCALE); tanh_cap_ls_z: LOGIT_CAP * tanh(z / LOGIT_CAP)
SIGMOID_CAP_SCALE = 7.5
