"""k-diffusion 0.1.1.post1 (Katherine Crowson, MIT licence: LICENSE here), the reference our samplers
and schedules are checked against.

``sampling.py`` and ``external.py`` are the release's files, unchanged. The package itself is not
installed because its ``__init__`` imports its training code, whose requirements (wandb,
torchvision, kornia, clip, scikit-image, and numpy below 2) do not belong in our test extra; the
two files need only torch, scipy, torchsde and torchdiffeq. ``utils.py`` here is ours: the one
helper of k-diffusion's ``utils`` that these two files call.
"""
