"""``[safety]`` in config.toml: the image classifier and the policy servers start from.

A server narrows or changes the policy with ``/server safety``; what it leaves unset comes from
here. Jobs asked in a DM, outside any server, follow these values as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config.settings import ConfigError, check, section

#: What a flagged result in a channel that is not age-restricted becomes.
MODES = ("off", "spoiler", "blur", "withhold")


@dataclass(frozen=True)
class SafetySettings:
    #: A transformers image-classification model: a Hugging Face Hub id or a local folder
    #: (``save_pretrained`` layout). Empty: no classifier, and no server can turn the policy on.
    classifier: str = ""
    #: The classifier's labels that count as not safe for work, and the score at which they do.
    labels: tuple[str, ...] = ("nsfw", "porn", "hentai", "sexy")
    threshold: float = 0.5
    #: The mode of servers that chose none, and of jobs asked in DMs.
    mode: str = "blur"
    #: Members' reports that hide a result until a moderator decides (servers may change it).
    reports_to_hide: int = 3
    #: Images per classifier call (results of several jobs are checked together).
    batch_size: int = 8
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return bool(self.classifier)


def parse_safety(raw: dict[str, Any]) -> SafetySettings:
    """``[safety]``, checked; raises ConfigError with one line."""
    settings: SafetySettings = section(raw, "safety", SafetySettings)
    check(settings.mode in MODES, "safety.mode", settings.mode, " / ".join(MODES))
    check(0.0 < settings.threshold <= 1.0, "safety.threshold", settings.threshold, "a score above 0, at most 1")
    check(1 <= settings.reports_to_hide <= 100, "safety.reports_to_hide", settings.reports_to_hide, "1 to 100")
    check(1 <= settings.batch_size <= 64, "safety.batch_size", settings.batch_size, "1 to 64")
    check(settings.device in ("cpu", "cuda") or settings.device.startswith("cuda:"), "safety.device",
          settings.device, "cpu, cuda or cuda:N")  # fmt: skip
    if not all(isinstance(label, str) and label.strip() for label in settings.labels) or not settings.labels:
        raise ConfigError(f'safety.labels: {settings.labels!r} must be the classifier\'s label names, e.g. ["nsfw"]')
    return settings
