"""Named tolerances (float32 unless said). Each says how it was chosen."""

# Incremental (prefill + one-token decode) vs one full forward: the same math in a different
# order of reductions. Observed max |Δ| ≈ 1e-6 on the tiny model with O(1) logits; 1e-4 is
# the bound and leaves two decades of headroom.
KV_CONSISTENCY_ATOL = 1e-4

# Per-image encoding vs one concatenated sequence with an explicit block-diagonal mask:
# observed ≈ 1e-6.
BLOCK_DIAGONAL_ATOL = 1e-5
