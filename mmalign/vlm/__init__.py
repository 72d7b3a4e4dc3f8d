"""Vision-language models: GRPO, PAPO, listener-shaped GRPO and VLM reward models on `mmalign.models.vlm`."""
