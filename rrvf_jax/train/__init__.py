"""Training: optimiser, train state, pure jitted steps, chunked log-probs and the SFT loss."""
