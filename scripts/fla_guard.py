"""FLA's Hopper guard, lifted for timing: shared by the benchmarks that time FLA's gated backward."""


def lift_fla_hopper_guard():
    """FLA 0.6.0 refuses its gated backward (`chunk_bwd_dqkwg` with a gate: the gated delta rule, simple GLA) on
    Hopper under Triton 3.4 to 3.7.0, where that kernel's results are wrong (FLA issue #640; its fixes, Triton >= 3.7.1
    or its TileLang backend, are not on the device image). For timing only, lift the guard: the same Triton kernels
    do the same work, and nothing reads their gradients. Returns a note for the rows where it was lifted, else None."""
    import fla.ops.common.chunk_o as chunk_o

    if not (chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not chunk_o.TRITON_ABOVE_3_7_1):
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True
    return "FLA's Hopper guard lifted (#640): its Triton backward timed, its gradients unreliable"
