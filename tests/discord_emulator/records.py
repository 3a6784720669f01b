"""What the emulator knows about its small Discord world, and how each thing looks on the wire.

Plain dataclasses (users, guilds, channels, attachments, messages, interactions) plus the
functions that turn them into the JSON payloads discord.py 2.7.1 parses. Tests read these
records directly: `message.content`, `message.custom_ids`, `message.edits`, `interaction.ack_latency`.
"""

from __future__ import annotations

import io
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Emulator

DISCORD_EPOCH_MS = 1420070400000
TIMESTAMP = "2024-01-01T00:00:00+00:00"

# Permission bits (https://discord.com/developers/docs/topics/permissions)
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_APPLICATION_COMMANDS = 1 << 31
ALL_PERMISSIONS = (1 << 51) - 1  # what Discord sends for an administrator / the bot
MEMBER_PERMISSIONS = (
    VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | ADD_REACTIONS
    | USE_APPLICATION_COMMANDS
)

EPHEMERAL = 1 << 6
LOADING = 1 << 7

_counter = itertools.count(1)


def snowflake() -> int:
    """A new id that sorts by creation time, so `discord.utils.snowflake_time` is sensible."""
    ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
    return (ms << 22) | (next(_counter) & 0x3FFFFF)


@dataclass(eq=False)
class User:
    id: int
    name: str
    bot: bool = False
    role_names: tuple[str, ...] = ()  # names of the guild roles this member holds ("moderator", "manager")

    def payload(self) -> dict[str, Any]:
        data = {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": self.name,
            "avatar": None,
        }
        if self.bot:
            data["bot"] = True
        return data


@dataclass(eq=False)
class Role:
    id: int
    name: str
    permissions: int

    def payload(self, position: int) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": position,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": True,
        }


@dataclass(eq=False)
class Guild:
    id: int
    name: str
    roles: dict[str, Role] = field(default_factory=dict)  # "everyone", "moderator", "manager"
    channels: list[Channel] = field(default_factory=list)
    owner_id: int | None = None  # the member who owns the server (sent as GUILD_CREATE's owner_id)

    def permissions_of(self, user: User, channel: Channel | None = None) -> int:
        """The member's permissions, in ``channel`` when given: Discord's order of overwrites
        (@everyone's, then the member's roles' together, then the member's own). The owner
        has every permission, whatever the overwrites."""
        if user.id == self.owner_id:
            return ALL_PERMISSIONS
        perms = self.roles["everyone"].permissions
        for name in user.role_names:
            perms |= self.roles[name].permissions
        if perms & ADMINISTRATOR:
            return ALL_PERMISSIONS
        if channel is not None and channel.overwrites:

            def apply(perms: int, targets: list[int]) -> int:
                allow = deny = 0
                for target in targets:
                    a, d = channel.overwrites.get(target, (0, 0))
                    allow, deny = allow | a, deny | d
                return (perms & ~deny) | allow

            perms = apply(perms, [self.id])  # @everyone's id is the guild's
            perms = apply(perms, [self.roles[name].id for name in user.role_names])
            perms = apply(perms, [user.id])
        return perms

    def member_payload(
        self, user: User, *, with_permissions: bool = False, channel: Channel | None = None
    ) -> dict[str, Any]:
        data = {
            "user": user.payload(),
            "roles": [str(self.roles[n].id) for n in user.role_names],
            "flags": 0,
            "joined_at": TIMESTAMP,
            "deaf": False,
            "mute": False,
            "nick": None,
        }
        if with_permissions:
            data["permissions"] = str(self.permissions_of(user, channel))
        return data


@dataclass(eq=False)
class Channel:
    id: int
    name: str
    guild: Guild | None  # None for a DM channel
    nsfw: bool = False
    deleted: bool = False  # set by Emulator.delete_channel: REST answers 404 10003
    # cleared by Emulator.revoke_permissions: every write answers 403 50013, whatever the bot's
    # cached permissions say (a change the bot was not told about)
    bot_allowed: bool = True
    recipient: User | None = None  # the member, for a DM channel (Emulator.dm_channel)
    # role or member id -> (allow, deny) permission bits (Emulator.set_permissions)
    overwrites: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def is_dm(self) -> bool:
        return self.guild is None

    def payload(self) -> dict[str, Any]:
        if self.guild is None:
            assert self.recipient is not None
            return {"id": str(self.id), "type": 1, "last_message_id": None, "recipients": [self.recipient.payload()]}
        return {
            "id": str(self.id),
            "type": 0,
            "name": self.name,
            "position": self.guild.channels.index(self),
            "guild_id": str(self.guild.id),
            "nsfw": self.nsfw,
            "topic": None,
            "permission_overwrites": [
                self._overwrite(target, allow, deny) for target, (allow, deny) in self.overwrites.items()
            ],
            "rate_limit_per_user": 0,
            "parent_id": None,
        }

    def _overwrite(self, target: int, allow: int, deny: int) -> dict[str, Any]:
        is_role = any(role.id == target for role in self.guild.roles.values())
        return {"id": str(target), "type": 0 if is_role else 1, "allow": str(allow), "deny": str(deny)}


@dataclass(eq=False)
class Attachment:
    id: int
    filename: str
    data: bytes
    content_type: str | None
    url: str
    size: int = -1  # what Discord claims; defaults to len(data). Tests may lie about it.
    width: int | None = None
    height: int | None = None
    description: str | None = None
    fetches: int = 0  # how many times the bot downloaded it from /cdn/

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = len(self.data)
        if self.width is None and (self.content_type or "").startswith("image/"):
            self.width, self.height = _image_size(self.data)

    def payload(self) -> dict[str, Any]:
        data = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
            "ephemeral": False,
        }
        if self.width is not None:
            data.update(width=self.width, height=self.height)
        if self.description:
            data["description"] = self.description
        return data


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height as Discord would report them, read from the header only."""
    try:
        from PIL import Image
    except ImportError:
        return None, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, None


@dataclass(eq=False)
class Message:
    id: int
    channel: Channel
    author: User
    content: str = ""
    embeds: list[dict] = field(default_factory=list)
    components: list[dict] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    nonce: str | None = None
    webhook_id: int | None = None
    interaction: Interaction | None = None  # set when the message answers an interaction
    reference: dict | None = None
    allowed_mentions: dict | None = None  # as the bot sent it (None: not sent)
    pinged_users: set[int] = field(default_factory=set)
    pinged_roles: set[int] = field(default_factory=set)
    pinged_everyone: bool = False
    reactions: dict[str, list[int]] = field(default_factory=dict)  # emoji -> user ids, in order
    edits: list[dict] = field(default_factory=list)  # payloads of earlier versions, oldest first
    deleted: bool = False
    created_at: float = 0.0  # loop.time()

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & LOADING)

    @property
    def pinged(self) -> bool:
        """Whether anybody got a notification from this message."""
        return bool(self.pinged_users or self.pinged_roles or self.pinged_everyone)

    @property
    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for c in iter_components(self.components) if "custom_id" in c]

    def find_component(self, custom_id: str) -> dict | None:
        return next((c for c in iter_components(self.components) if c.get("custom_id") == custom_id), None)

    def payload(self) -> dict[str, Any]:
        guild = self.channel.guild
        data = {
            "id": str(self.id),
            "channel_id": str(self.channel.id),
            "type": 0,
            "content": self.content,
            "author": self.author.payload(),
            "attachments": [a.payload() for a in self.attachments],
            "embeds": self.embeds,
            "components": self.components,
            "mentions": [],
            "mention_roles": [str(r) for r in self.pinged_roles],
            "mention_everyone": self.pinged_everyone,
            "pinned": False,
            "tts": False,
            "timestamp": TIMESTAMP,
            "edited_timestamp": TIMESTAMP if self.edits else None,
            "flags": self.flags,
        }
        if guild is not None:
            data["guild_id"] = str(guild.id)
        if self.nonce is not None:
            data["nonce"] = self.nonce
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
            data["application_id"] = str(self.webhook_id)
        if self.reference is not None:
            data["message_reference"] = self.reference
        if self.interaction is not None:
            ix = self.interaction
            data["interaction_metadata"] = {
                "id": str(ix.id),
                "type": ix.type,
                "user": ix.user.payload(),
                "authorizing_integration_owners": {"0": str(guild.id)} if guild else {"1": str(ix.user.id)},
            }
        if self.reactions:
            data["reactions"] = [
                {
                    "emoji": emoji_payload(e),
                    "count": len(users),
                    "me": False,
                    "burst_colors": [],
                    "count_details": {"burst": 0, "normal": len(users)},
                }
                for e, users in self.reactions.items()
                if users
            ]
        return data


@dataclass(eq=False)
class Interaction:
    """One interaction the emulator dispatched, and everything the bot did in answer."""

    id: int
    token: str
    type: int  # 2 slash command, 3 component, 5 modal submit
    user: User
    channel: Channel
    data: dict
    message: Message | None  # the message whose component was used (component / modal from one)
    created_at: float  # loop.time() at dispatch
    emulator: Emulator = field(repr=False)
    acked_at: float | None = None
    response_type: int | None = None  # 4, 5, 6, 7, 8 or 9
    response_data: dict | None = None
    original: Message | None = None  # the message @original refers to
    followups: list[Message] = field(default_factory=list)
    modal: dict | None = None  # the modal the bot opened (type 9)

    @property
    def ack_latency(self) -> float | None:
        """Seconds between dispatch and the bot's first callback (None if never acknowledged)."""
        return None if self.acked_at is None else self.acked_at - self.created_at

    @property
    def messages(self) -> list[Message]:
        """The response message (if it is this interaction's own) followed by the followups."""
        own = [self.original] if self.original is not None and self.original.interaction is self else []
        return own + self.followups

    @property
    def ephemeral_messages(self) -> list[Message]:
        return [m for m in self.messages if m.ephemeral]

    async def wait_ack(self, timeout: float = 60.0) -> int:
        """Wait until the bot acknowledged; returns the callback type (4, 5, 6, 7, 9...). The wait
        ends at the signal; its bound only stops a test that would hang (a loaded CI box is slow:
        Discord's own 3-second deadline is checked from the emulator's timestamps, not here)."""
        await self.emulator.wait_for(lambda: self.response_type, timeout, f"an ack of interaction {self.id}")
        assert self.response_type is not None
        return self.response_type

    async def wait_response(self, pred: Callable[[Message], bool] | None = None, timeout: float = 60.0) -> Message:
        """Wait for a response message (original or followup, not loading) that satisfies `pred`."""

        def found() -> Message | None:
            return next((m for m in self.messages if not m.loading and (pred is None or pred(m))), None)

        return await self.emulator.wait_for(found, timeout, f"a response to interaction {self.id}")


def iter_components(components: list[dict]):
    """Every component, depth first (action rows, containers, sections, labels included)."""
    for component in components:
        yield component
        yield from iter_components(component.get("components", []))
        if "component" in component:
            yield from iter_components([component["component"]])
        if "accessory" in component:
            yield from iter_components([component["accessory"]])


def emoji_payload(emoji: str) -> dict[str, Any]:
    """'🔁' -> unicode emoji; 'name:123' (the URL form of a custom emoji) -> custom emoji."""
    name, sep, emoji_id = emoji.partition(":")
    if sep and emoji_id.isdigit():
        return {"id": emoji_id, "name": name}
    return {"id": None, "name": emoji}


_MENTION = re.compile(r"<@!?(\d+)>|<@&(\d+)>|@(everyone|here)")


def compute_pings(
    content: str, allowed: dict | None, guild: Guild | None, users: dict[int, User], replied_to: User | None
) -> tuple[set[int], set[int], bool]:
    """Who Discord would notify for `content`: (user ids, role ids, everyone/here).

    Without `allowed_mentions` everything parsed pings (and a reply pings its author); with it,
    only the kinds in `parse` or the ids listed, and the replied author only if `replied_user`.
    """
    if allowed is None:
        parse, allow_users, allow_roles, replied = {"users", "roles", "everyone"}, set(), set(), True
    else:
        parse = set(allowed.get("parse", []))
        allow_users = {int(u) for u in allowed.get("users", [])}
        allow_roles = {int(r) for r in allowed.get("roles", [])}
        replied = bool(allowed.get("replied_user", False))
    role_ids = {role.id for role in guild.roles.values()} if guild is not None else set()
    pinged_users: set[int] = set()
    pinged_roles: set[int] = set()
    everyone = False
    for match in _MENTION.finditer(content):
        user_id, role_id, everyone_word = match.groups()
        if user_id and int(user_id) in users and ("users" in parse or int(user_id) in allow_users):
            pinged_users.add(int(user_id))
        elif role_id and int(role_id) in role_ids and ("roles" in parse or int(role_id) in allow_roles):
            pinged_roles.add(int(role_id))
        elif everyone_word and "everyone" in parse:
            everyone = True
    if replied_to is not None and replied:
        pinged_users.add(replied_to.id)
    return pinged_users, pinged_roles, everyone
