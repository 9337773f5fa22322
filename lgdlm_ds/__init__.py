"""lgdlm-ds: LGDLM (an MMDiT over text tokens and one latent vector) trained under DeepSpeed."""
