"""Stable Diffusion 1.x, 2.x and XL: the UNet's denoiser, CLIP prompts with AUTOMATIC1111's
syntax and the CLIP tokenizer."""
