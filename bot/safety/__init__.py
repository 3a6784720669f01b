"""Image safety: every result and every upload classified, and a per-server policy for what a
flagged image becomes in a channel that is not age-restricted (Discord's rules keep sexual
content in age-restricted channels).

* settings.py: ``[safety]`` in config.toml;
* classifier.py: the model (transformers' image-classification classes), loaded as checkpoints
  are, and run in batches on a thread of its own;
* policy.py: pure decisions: is an image flagged, what becomes of it where;
* images.py: the blurred copy;
* moderation.py: reports, Reveal, ``/server review`` (restore, delete, bar) and strikes.
"""
