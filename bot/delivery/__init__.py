"""Delivery: how a finished job reaches its member, and how its status message follows it.

Two kinds of message, kept apart so that a result is posted once whatever happens to the other:

* the **status message** (statuses.py): the interaction's "thinking…" reply, edited while the
  job waits (place in line, Cancel) and runs (step / total, a preview), and a last time to say
  done with a link, failed or cancelled;
* the **result message** (posting.py): mention, embed, PNGs and buttons, posted exactly once
  (the job id is the nonce), and again on ``/show job``.

loop.py is the task that ties them together for each finished job, in order; fallbacks.py
decides where the result goes (the channel, the requester's DMs) and where instead when Discord
refuses it (missing permissions, closed DMs), and tells the server's owner what is missing.
tasks.py keeps the background tasks referenced; errors.py tells Discord's answers apart.
"""

from bot.delivery.loop import Delivery
from bot.delivery.posting import nonce_for
from bot.delivery.statuses import token_expiry

__all__ = ["Delivery", "nonce_for", "token_expiry"]
