"""Image methods: Diffusion-DPO, SFT (and SmPO, GAN-RM in later modules)."""
