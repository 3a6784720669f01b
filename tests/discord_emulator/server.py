"""A small Discord API emulator: gateway websocket + REST on 127.0.0.1, for the real discord.py client.

One `Emulator` is one Discord: a bot application, one guild (more can be added) with members of
different permissions, and the REST routes a bot uses while answering commands. Tests act as
members through the actor methods (`slash`, `click`, `submit_modal`, `react`) and read what the
bot did from the records (`messages`, `interaction.original`, `message.edits`, pings...).
Faults (429, 5xx, deleted channels, missing permissions) are injected with `fail_next`,
`delete_channel`, `set_permissions` (overwrites, which the REST routes enforce as Discord does:
see `RestRoutes._create_message`) and `revoke_permissions`. The wire facts come from
shared/DISCORD.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

from .records import (
    MANAGE_GUILD,
    MANAGE_MESSAGES,
    MEMBER_PERMISSIONS,
    Attachment,
    Channel,
    Guild,
    Interaction,
    Message,
    Role,
    User,
    emoji_payload,
    snowflake,
)
from .rest import MAX_FILE_BYTES, MAX_REQUEST_BYTES, Call, Fault, RestRoutes

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class _Session:
    id: str
    ws: web.WebSocketResponse | None
    seq: int = 0
    sent: list[dict] | None = None  # every dispatch, for replay on RESUME
    ready: bool = False  # READY and every GUILD_CREATE sent


class Emulator(RestRoutes):
    """A local Discord. Use as `async with Emulator() as emu:`; then patch discord.py with
    `patch_discord(emu)` (see harness.py) and start the bot with `emu.token`."""

    def __init__(self, *, token: str = "emulator-token", bot_name: str = "sdbot") -> None:
        self.token = token
        self.bot_user = User(snowflake(), bot_name, bot=True)
        self.app_id = self.bot_user.id
        self.ack_deadline = 3.0  # seconds to the first callback (10062 after)
        self.token_lifetime = 15 * 60.0  # seconds a token works for followups / @original
        self.nonce_window = 5 * 60.0  # seconds a nonce with enforce_nonce is remembered
        self.attachment_size_limit = MAX_FILE_BYTES
        self.users: dict[int, User] = {}
        self.guilds: list[Guild] = []
        self.messages: dict[int, Message] = {}
        self.attachments: dict[int, Attachment] = {}
        self.interactions: dict[int, Interaction] = {}
        self.commands: dict[int | None, list[dict]] = {}  # guild id (None = global) -> synced commands
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.identify: dict | None = None  # the last IDENTIFY payload (intents...)
        self.port = 0
        self.dm_channels: dict[int, Channel] = {}  # user id -> the bot's DM channel with them
        self.dms_blocked: set[int] = set()  # user ids whose DMs answer 403 50007
        self._nonces: dict[str, tuple[Message, float]] = {}
        self._by_token: dict[str, Interaction] = {}
        self._session: _Session | None = None
        self._changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self.guild = self.add_guild("Emulated Guild")
        self.general = self.add_channel("general")
        self.nsfw_channel = self.add_channel("age-restricted", nsfw=True)
        self.alice = self.add_user("alice")
        self.bob = self.add_user("bob")
        self.mod = self.add_user("mod", roles=("moderator",))  # Manage Messages
        self.admin = self.add_user("admin", roles=("manager",))  # Manage Server
        self.owner = self.add_user("owner")  # owns every guild: all permissions
        for guild in self.guilds:
            guild.owner_id = self.owner.id

    # ---------------------------------------------------------------- world set-up (before the bot connects)

    def add_guild(self, name: str) -> Guild:
        """A guild owned by `self.owner` (every user is a member of every guild)."""
        owner = getattr(self, "owner", None)  # not made yet for the first guild
        guild = Guild(snowflake(), name, owner_id=owner.id if owner is not None else None)
        guild.roles = {
            "everyone": Role(guild.id, "@everyone", MEMBER_PERMISSIONS),
            "moderator": Role(snowflake(), "Moderator", MANAGE_MESSAGES),
            "manager": Role(snowflake(), "Server Manager", MANAGE_GUILD),
        }
        self.guilds.append(guild)
        return guild

    def add_channel(self, name: str, *, nsfw: bool = False, guild: Guild | None = None) -> Channel:
        guild = guild or self.guilds[0]
        channel = Channel(snowflake(), name, guild, nsfw=nsfw)
        guild.channels.append(channel)
        return channel

    def add_user(self, name: str, *, roles: tuple[str, ...] = ()) -> User:
        """A member of every guild; `roles` from "moderator" (Manage Messages), "manager" (Manage Server)."""
        user = User(snowflake(), name, role_names=roles)
        self.users[user.id] = user
        return user

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """What discord.http.Route.BASE must be."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_REQUEST_BYTES + 1024 * 1024)
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and session.ws is not None:
            await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- waiting

    def _bump(self) -> None:
        """Wake everything waiting in wait_for: some state changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0, what: str = "a condition") -> T:
        """Wait until `predicate()` returns something truthy, and return it.

        Checked on every emulator event and at least every 0.1 s, so a predicate may also look
        at state outside the emulator (the bot's database, say)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (result := predicate()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"emulator: no {what} within {timeout} s")
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass
        return result

    async def wait_connected(self, timeout: float = 5.0) -> None:
        """Wait until a bot has identified on the gateway and received its guilds."""
        await self.wait_for(lambda: self.connected, timeout, "bot connected to the gateway")

    def channel_messages(self, channel: Channel, *, include_deleted: bool = False) -> list[Message]:
        """Messages everyone can see in `channel`, oldest first (ephemeral ones are not in a channel)."""
        return [
            m
            for m in self.messages.values()
            if m.channel is channel and not m.ephemeral and (include_deleted or not m.deleted)
        ]

    async def wait_for_message(
        self, channel: Channel, pred: Callable[[Message], bool] | None = None, timeout: float = 5.0
    ) -> Message:
        """The first visible message in `channel` satisfying `pred`, waiting for it if needed."""

        def found() -> Message | None:
            return next((m for m in self.channel_messages(channel) if pred is None or pred(m)), None)

        return await self.wait_for(found, timeout, f"matching message in #{channel.name}")

    def dm_channel(self, user: User, *, create: bool = False) -> Channel | None:
        """The bot's DM channel with `user` (type 1), if the bot opened one (or `create`)."""
        channel = self.dm_channels.get(user.id)
        if channel is None and create:
            channel = self.dm_channels[user.id] = Channel(snowflake(), "", None, recipient=user)
        return channel

    def dm_messages(self, user: User) -> list[Message]:
        """The messages in the bot's DM channel with `user`, oldest first (none if never opened)."""
        channel = self.dm_channels.get(user.id)
        return [] if channel is None else self.channel_messages(channel)

    async def wait_for_dm(
        self, user: User, pred: Callable[[Message], bool] | None = None, timeout: float = 5.0
    ) -> Message:
        """The first message to `user` by DM satisfying `pred`, waiting for it if needed."""

        def found() -> Message | None:
            return next((m for m in self.dm_messages(user) if pred is None or pred(m)), None)

        return await self.wait_for(found, timeout, f"matching DM to {user.name}")

    def pings(self) -> list[Message]:
        """Every message that notified somebody."""
        return [m for m in self.messages.values() if m.pinged]

    def command(self, name: str, guild: Guild | None = None) -> dict:
        """The synced command `name` as the bot registered it (guild commands first, then global)."""
        command = self._find_command(name, guild or self.guild)
        if command is None:
            raise LookupError(f"command /{name} is not synced; synced: {self.command_names()}")
        return command[0]

    def attachment(self, filename: str, data: bytes, content_type: str | None = None, *, size: int = -1) -> Attachment:
        """A file a member uploads (for slash options); served under /cdn/. `size` may lie."""
        if content_type is None:
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        attachment_id = snowflake()
        attachment = Attachment(
            attachment_id, filename, data, content_type, f"{self.base_url}/cdn/{attachment_id}/{filename}", size=size
        )
        self.attachments[attachment.id] = attachment
        return attachment

    # ---------------------------------------------------------------- faults

    def fail_next(
        self,
        method: str,
        pattern: str,
        status: int = 429,
        *,
        count: int = 1,
        retry_after: float = 0.05,
        code: int = 0,
        after: bool = False,
    ) -> Fault:
        """Make the next `count` requests matching `method` ("*" = any) and `pattern` (like
        "/channels/*/messages") answer `status`. Returns the Fault; `fault.hits` counts uses."""
        fault = Fault(method.upper(), pattern, status, count, retry_after, code, after)
        self.faults.append(fault)
        return fault

    async def delete_channel(self, channel: Channel) -> None:
        """The channel disappears: CHANNEL_DELETE, then REST on it answers 404 10003."""
        channel.deleted = True
        await self._dispatch("CHANNEL_DELETE", channel.payload())

    async def set_age_restricted(self, channel: Channel, nsfw: bool = True) -> None:
        """A manager marks the channel age-restricted (Discord's ``nsfw`` flag), or not: CHANNEL_UPDATE."""
        channel.nsfw = nsfw
        await self._dispatch("CHANNEL_UPDATE", channel.payload())

    async def set_permissions(self, channel: Channel, target: Role | User, *, allow: int = 0, deny: int = 0) -> None:
        """A permission overwrite on `channel` for a role or a member (CHANNEL_UPDATE tells the bot).
        `target` may be `self.bot_user`: the REST routes then refuse what the bot may not do there."""
        channel.overwrites[target.id] = (allow, deny)
        await self._dispatch("CHANNEL_UPDATE", channel.payload())

    def revoke_permissions(self, channel: Channel, revoked: bool = True) -> None:
        """The bot may no longer post in `channel` (403 50013), or may again with revoked=False.
        Nothing tells the bot: its cached permissions still allow everything there."""
        channel.bot_allowed = not revoked

    def block_dms(self, user: User, blocked: bool = True) -> None:
        """`user` does not accept DMs from the bot (privacy settings): posting in the DM channel
        answers 403 50007 "Cannot send messages to this user"; opening the channel still works."""
        if blocked:
            self.dms_blocked.add(user.id)
        else:
            self.dms_blocked.discard(user.id)

    async def delete_message(self, message: Message) -> None:
        """Somebody (a moderator) deletes a message: MESSAGE_DELETE; later edits get 404 10008."""
        message.deleted = True
        self._bump()
        await self._dispatch("MESSAGE_DELETE", self._delete_event(message))

    @property
    def connected(self) -> bool:
        """Whether a bot is identified and its websocket is up."""
        return self._session is not None and self._session.ready and self._session.ws is not None

    async def reconnect_gateway(self) -> None:
        """Ask the bot to reconnect (op 7). Events dispatched from now until it has resumed are
        held back and replayed after its RESUME, as Discord does."""
        session = self._session
        if session is not None and session.ws is not None:
            async with self._send_lock:
                ws, session.ws = session.ws, None
                await ws.send_str(json.dumps({"op": 7, "d": None}))

    # ---------------------------------------------------------------- actors: what members do

    async def slash(
        self,
        user: User,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        channel: Channel | None = None,
        attachments: dict[str, Attachment] | None = None,
    ) -> Interaction:
        """`user` runs `/name` with `options` ({name: value}; Attachment / User values are resolved).
        `name` may hold subcommands: "settings show". Types come from the synced definition."""
        channel = channel or self.general
        words = name.split()
        found = self._find_command(words[0], channel.guild)
        if found is None:
            raise LookupError(f"command /{words[0]} is not synced; synced: {self.command_names()}")
        command, guild_id = found
        data: dict[str, Any] = {"id": command["id"], "name": words[0], "type": 1, "options": []}
        if guild_id is not None:
            data["guild_id"] = str(guild_id)
        spec, target = command, data["options"]
        for word in words[1:]:
            spec = self._option_spec(spec, word, words[0])
            node = {"name": word, "type": spec["type"], "options": []}
            target.append(node)
            target = node["options"]
        resolved: dict[str, dict] = {}
        given = {**(options or {}), **(attachments or {})}
        for option_name, value in given.items():
            option = self._option_spec(spec, option_name, name)
            target.append(
                {"name": option_name, "type": option["type"], "value": self._resolve(value, channel.guild, resolved)}
            )
        missing = [o["name"] for o in spec.get("options", []) if o.get("required") and o["name"] not in given]
        if missing:
            raise ValueError(f"/{name}: a Discord client cannot omit required options {missing}")
        if resolved:
            data["resolved"] = resolved
        return await self._interact(2, user, channel, data)

    def post(
        self, user: User, content: str = "", *, channel: Channel | None = None, attachments: tuple[Attachment, ...] = ()
    ) -> Message:
        """A message `user` posts (the bot asks for no message intent, so no event is sent)."""
        channel = channel or self.general
        message = Message(
            snowflake(),
            channel,
            user,
            content,
            attachments=list(attachments),
            created_at=asyncio.get_running_loop().time(),
        )
        self.messages[message.id] = message
        return message

    async def message_command(self, user: User, name: str, message: Message) -> Interaction:
        """`user` picks Apps → `name` on `message` (a message context menu, command type 3)."""
        channel = message.channel
        for scope in (channel.guild.id if channel.guild else None, None):
            command = next((c for c in self.commands.get(scope, []) if c["name"] == name and c.get("type") == 3), None)
            if command is not None:
                break
        else:
            raise LookupError(f"no message command {name!r} is synced; synced: {self.command_names()}")
        data = {
            "id": command["id"],
            "name": name,
            "type": 3,
            "target_id": str(message.id),
            "resolved": {"messages": {str(message.id): message.payload()}},
        }
        if scope is not None:
            data["guild_id"] = str(scope)
        return await self._interact(2, user, channel, data)

    async def click(
        self, user: User, message: Message, custom_id: str, *, values: list[str] | None = None
    ) -> Interaction:
        """`user` presses the button (or picks `values` in the select) `custom_id` on `message`."""
        component = message.find_component(custom_id)
        if component is None:
            raise LookupError(f"message {message.id} has no component {custom_id!r}; it has {message.custom_ids}")
        if component.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled; a Discord client cannot press it")
        if message.deleted:
            raise ValueError(f"message {message.id} is deleted")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if values is not None:
            data["values"] = list(values)
        return await self._interact(3, user, message.channel, data, message)

    async def submit_modal(self, user: User, opened_by: Interaction, values: dict[str, str]) -> Interaction:
        """`user` fills in and submits the modal the bot opened in answer to `opened_by`.
        `values` is keyed by input label or custom_id; inputs not in it keep the pre-filled value."""
        modal = opened_by.modal
        if modal is None:
            raise ValueError(
                f"interaction {opened_by.id} did not open a modal (response type {opened_by.response_type})"
            )
        rows, unknown = [], set(values)
        for row in modal.get("components", []):
            label = row["type"] == 18
            for field in [row["component"]] if label else row.get("components", []):
                # A member sees labels, discord.py makes random custom_ids: accept either as the key.
                keys = [k for k in (field["custom_id"], row.get("label"), field.get("label")) if k in values]
                answer = {"type": field["type"], "custom_id": field["custom_id"]}
                if field["type"] == 4:
                    answer["value"] = values[keys[0]] if keys else field.get("value") or ""
                else:
                    answer["values"] = list(values[keys[0]]) if keys else []
                unknown.difference_update(keys)
                rows.append({"type": 18, "component": answer} if label else {"type": 1, "components": [answer]})
        if unknown:
            raise KeyError(f"modal {modal.get('title')!r} has no inputs {sorted(unknown)}")
        data = {"custom_id": modal["custom_id"], "components": rows}
        return await self._interact(5, user, opened_by.channel, data, opened_by.message)

    async def react(self, user: User, message: Message, emoji: str) -> None:
        """`user` adds the reaction `emoji` ("🔁", or "name:id" for a custom one) to `message`."""
        await self._add_reaction(user, message, emoji)

    async def unreact(self, user: User, message: Message, emoji: str) -> None:
        await self._remove_reaction(user, message, emoji)

    async def _add_reaction(self, user: User, message: Message, emoji: str) -> None:
        users = message.reactions.setdefault(emoji, [])
        if user.id in users:
            return
        users.append(user.id)
        guild = message.channel.guild
        event = {
            "user_id": str(user.id),
            "channel_id": str(message.channel.id),
            "message_id": str(message.id),
            "emoji": emoji_payload(emoji),
            "message_author_id": str(message.author.id),
            "burst": False,
            "burst_colors": [],
            "type": 0,
        }
        if guild is not None:
            event.update(guild_id=str(guild.id), member=guild.member_payload(user))
        await self._dispatch("MESSAGE_REACTION_ADD", event)

    async def _remove_reaction(self, user: User, message: Message, emoji: str) -> None:
        users = message.reactions.get(emoji, [])
        if user.id not in users:
            return
        users.remove(user.id)
        event = {
            "user_id": str(user.id),
            "channel_id": str(message.channel.id),
            "message_id": str(message.id),
            "emoji": emoji_payload(emoji),
            "burst": False,
            "type": 0,
        }
        if message.channel.guild is not None:
            event["guild_id"] = str(message.channel.guild.id)
        await self._dispatch("MESSAGE_REACTION_REMOVE", event)

    # ---------------------------------------------------------------- gateway

    async def _dispatch(self, event: str, data: dict) -> None:
        """Send an event to the bot's session; kept for replay if it is reconnecting, dropped if none."""
        session = self._session
        if session is None:
            return
        async with self._send_lock:
            session.seq += 1
            frame = {"op": 0, "t": event, "s": session.seq, "d": data}
            assert session.sent is not None
            session.sent.append(frame)
            if session.ws is not None and not session.ws.closed:
                try:
                    await session.ws.send_str(json.dumps(frame))
                except ConnectionResetError:
                    session.ws = None  # the bot went away mid-send; RESUME replays the frame
        self._bump()

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._gateway_frame(ws, json.loads(msg.data))
        finally:
            session = self._session
            if session is not None and session.ws is ws:
                session.ws = None
                self._bump()
        return ws

    async def _gateway_frame(self, ws: web.WebSocketResponse, frame: dict) -> None:
        op, d = frame.get("op"), frame.get("d")
        if op == 1:
            await ws.send_str(json.dumps({"op": 11}))
        elif op == 2:
            if d.get("token") != self.token:
                await ws.close(code=4004, message=b"Authentication failed.")
                return
            self.identify = d
            old = self._session
            self._session = _Session(secrets.token_hex(16), ws, sent=[])
            if old is not None and old.ws is not None and old.ws is not ws:
                await old.ws.close()
            await self._dispatch(
                "READY",
                {
                    "v": 10,
                    "user": self.bot_user.payload(),
                    "session_id": self._session.id,
                    "resume_gateway_url": self.gateway_url,
                    "application": {"id": str(self.app_id), "flags": 0},
                    "guilds": [{"id": str(g.id), "unavailable": True} for g in self.guilds],
                    "shard": d.get("shard", [0, 1]),
                    "private_channels": [],
                    "relationships": [],
                },
            )
            for guild in self.guilds:
                await self._dispatch("GUILD_CREATE", self._guild_payload(guild))
            self._session.ready = True
            self._bump()
        elif op == 6:
            session = self._session
            if session is None or d.get("session_id") != session.id or d.get("token") != self.token:
                await ws.send_str(json.dumps({"op": 9, "d": False}))
                return
            async with self._send_lock:
                session.ws = ws
                assert session.sent is not None
                for missed in session.sent:
                    if missed["s"] > (d.get("seq") or 0):
                        await ws.send_str(json.dumps(missed))
                session.seq += 1
                await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": session.seq, "d": {}}))
            self._bump()

    def _guild_payload(self, guild: Guild) -> dict:
        members = [self.bot_user, *self.users.values()]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "unavailable": False,
            "owner_id": str(guild.owner_id or self.app_id + 1),
            "member_count": len(members),
            "large": False,
            "icon": None,
            "features": [],
            "roles": [role.payload(i) for i, role in enumerate(guild.roles.values())],
            "channels": [c.payload() for c in guild.channels if not c.deleted],
            "members": [guild.member_payload(u) for u in members],
            "threads": [],
            "emojis": [],
            "stickers": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "premium_tier": 0,
            "preferred_locale": "en-US",
        }

    async def _interact(
        self, kind: int, user: User, channel: Channel, data: dict, message: Message | None = None
    ) -> Interaction:
        if self._session is None:
            raise RuntimeError("emulator: no bot has identified on the gateway; start it first")
        ix = Interaction(
            snowflake(),
            secrets.token_urlsafe(120),
            kind,
            user,
            channel,
            data,
            message,
            asyncio.get_running_loop().time(),
            self,
        )
        self.interactions[ix.id] = ix
        self._by_token[ix.token] = ix
        guild = channel.guild
        payload = {
            "id": str(ix.id),
            "application_id": str(self.app_id),
            "type": kind,
            "token": ix.token,
            "version": 1,
            "channel_id": str(channel.id),
            "channel": channel.payload(),
            "app_permissions": str(self.bot_permissions(channel)),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": self.attachment_size_limit,
            "data": data,
        }
        if guild is not None:
            payload.update(
                guild_id=str(guild.id),
                member=guild.member_payload(user, with_permissions=True, channel=channel),
                guild_locale="en-US",
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
            )
        else:  # the bot's DM with the member: a user instead of a member, context BOT_DM
            payload.update(user=user.payload(), authorizing_integration_owners={"0": "0"}, context=1)
        if message is not None:
            payload["message"] = message.payload()
        ix.created_at = asyncio.get_running_loop().time()
        await self._dispatch("INTERACTION_CREATE", payload)
        return ix
