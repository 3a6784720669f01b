"""Device -> host copies that nobody waits for: what the host reads in steady state (issue 11 §1).

A step must never make the host wait for the GPU's queue, or the GPU idles while the host catches
up. What the host needs from the device every few steps (the NaN check's flags, the previews'
pixels) is copied with :class:`Readback`: on CUDA a non-blocking copy into pinned host memory,
with an event recorded behind it, and :meth:`Readback.ready` asks the event (it never blocks); the
engine thread asks at each step boundary and hands over what has arrived. On the CPU it is the
same code path without pinning: the copy is done when it returns.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Readback:
    """A copy of ``tensor`` on the host, ready once :meth:`ready` says so (then read :attr:`host`)."""

    def __init__(self, tensor: Tensor) -> None:
        cuda = tensor.device.type == "cuda"
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        self.host.copy_(tensor, non_blocking=cuda)
        self._event = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def ready(self) -> bool:
        """Whether the copy has landed (asks the device's queue; never waits for it)."""
        return self._event is None or self._event.query()

    def wait(self) -> Tensor:
        """Block until the copy has landed: only where the device is idle anyway (an empty batch)."""
        if self._event is not None:
            self._event.synchronize()
        return self.host
