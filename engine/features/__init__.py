"""What edits and extends a job: masks, inpainting and outpainting, the hires fix, LoRA, and
the upscalers."""
