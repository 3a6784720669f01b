"""The REST half of the emulator: the routes a bot calls, Discord's error answers, and faults.

`RestRoutes` is mixed into `Emulator` (server.py), which owns the state these handlers read and
change: `messages`, `interactions`, `commands`, `attachments`, `faults`, `calls`. Every handler
either returns what Discord would or raises `ApiError` with Discord's status and code.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .records import (
    ALL_PERMISSIONS,
    ATTACH_FILES,
    EMBED_LINKS,
    EPHEMERAL,
    LOADING,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    Attachment,
    Channel,
    Guild,
    Interaction,
    Message,
    User,
    compute_pings,
    iter_components,
    snowflake,
)

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 10 * 1024 * 1024  # per attachment (webhooks and interaction responses too)
MAX_REQUEST_BYTES = 25 * 1024 * 1024


class ApiError(Exception):
    """An error answer in Discord's format: {"code": ..., "message": ...} with an HTTP status."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message = status, code, message


@dataclass(eq=False)
class Fault:
    """The next `count` requests matching `method` and `pattern` (fnmatch on the path after /api/v10)
    fail with `status`. `after=True` lets the request take effect first and only loses the answer,
    like a gateway timeout after Discord created the message."""

    method: str
    pattern: str
    status: int
    count: int
    retry_after: float
    code: int
    after: bool
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.hits < self.count and self.method in ("*", method) and fnmatch.fnmatchcase(path, self.pattern)

    def response(self) -> web.Response:
        if self.status == 429:
            # Discord's rate-limit answer (docs: topics/rate-limits): the JSON body with retry_after
            # in seconds, Retry-After, and every X-RateLimit-* header (discord.py reads all or none).
            body = {"message": "You are being rate limited.", "retry_after": self.retry_after, "global": False}
            headers = {
                "Via": "1.1 google",
                "Retry-After": str(max(1, round(self.retry_after))),
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + self.retry_after:.3f}",
                "X-RateLimit-Reset-After": f"{self.retry_after:.3f}",
                "X-RateLimit-Bucket": "emulated-bucket",
                "X-RateLimit-Scope": "user",
            }
            return _json(body, 429, headers)
        return _json({"code": self.code, "message": f"{self.status}: emulated failure"}, self.status)


@dataclass(eq=False)
class Call:
    """One REST request the bot made, with the status it got."""

    method: str
    path: str
    status: int


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Content-Type must be exactly application/json: discord.py compares with == (DISCORD.md §1).
    return web.Response(
        status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )


def _command_problems(spec: dict, path: str, top: bool = True) -> list[str]:
    """What Discord would reject in a chat-input command (or option) definition."""
    if top and spec.get("type", 1) != 1:
        return []  # user/message context menus: free-form names, no description
    name, where = spec.get("name", ""), path + spec.get("name", "?")
    problems = []
    if not re.fullmatch(r"[-_'\w]{1,32}", name) or name != name.lower():
        problems.append(f"{where}: name must be 1-32 lowercase letters, digits, - or _")
    if not 1 <= len(spec.get("description", "")) <= 100:
        problems.append(f"{where}: description must be 1-100 characters")
    options = spec.get("options") or []
    if len(options) > 25:
        problems.append(f"{where}: at most 25 options")
    if len(spec.get("choices") or []) > 25:
        problems.append(f"{where}: at most 25 choices")
    optional_seen = False
    for option in options:
        if option.get("required") and optional_seen:
            problems.append(f"{where}: required option {option['name']} after an optional one")
        optional_seen |= not option.get("required") and option.get("type") not in (1, 2)
        problems += _command_problems(option, where + " ", top=False)
    return problems


class RestRoutes:
    """Request handlers; `self` is the Emulator, which sets up this state (see server.py)."""

    token: str
    bot_user: User
    app_id: int
    ack_deadline: float
    token_lifetime: float
    nonce_window: float
    users: dict[int, User]
    guilds: list[Guild]
    messages: dict[int, Message]
    interactions: dict[int, Interaction]
    commands: dict[int | None, list[dict]]
    calls: list[Call]
    faults: list[Fault]
    _nonces: dict[str, tuple[Message, float]]
    _by_token: dict[str, Interaction]
    dm_channels: dict[int, Channel]
    dms_blocked: set[int]
    dm_channel: Callable[..., Channel]

    # ---------------------------------------------------------------- REST plumbing

    def _add_routes(self, app: web.Application) -> None:
        api, r = "/api/v10", app.router
        r.add_get("/gateway", self._gateway)
        r.add_get("/cdn/{attachment_id}/{filename}", self._cdn)
        routes = [
            ("GET", "/gateway/bot", self._gateway_bot),
            ("GET", "/users/@me", self._me),
            ("POST", "/users/@me/channels", self._create_dm),
            ("GET", "/users/{user_id}", self._get_user),
            ("GET", "/oauth2/applications/@me", self._app_info),
            ("GET", "/applications/{app_id}/commands", self._get_commands),
            ("PUT", "/applications/{app_id}/commands", self._put_commands),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands", self._get_commands),
            ("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", self._put_commands),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._callback),
            ("POST", "/webhooks/{app_id}/{token}", self._followup),
            ("GET", "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_message),
            ("PATCH", "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_message),
            ("DELETE", "/webhooks/{app_id}/{token}/messages/{message_id}", self._webhook_message),
            ("GET", "/channels/{channel_id}", self._get_channel),
            ("GET", "/channels/{channel_id}/messages", self._list_messages),
            ("POST", "/channels/{channel_id}/messages", self._create_message),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._edit_message),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message),
            ("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._bot_reaction),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/{user_id}", self._bot_reaction),
        ]
        for method, path, handler in routes:
            r.add_route(method, api + path, handler)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        path = request.path.removeprefix("/api/v10")
        fault = next((f for f in self.faults if f.matches(request.method, path)), None)
        if fault is not None:
            fault.hits += 1
        try:
            if (
                request.path.startswith("/api/")
                and not path.startswith(("/interactions/", "/webhooks/"))
                and request.headers.get("Authorization") != f"Bot {self.token}"
            ):
                raise ApiError(401, 0, "401: Unauthorized")
            if fault is not None and not fault.after:
                response = fault.response()
            else:
                response = await handler(request)
                if fault is not None:
                    response = fault.response()  # it happened, but the bot never hears so
        except ApiError as error:
            response = _json({"code": error.code, "message": error.message}, error.status)
        except web.HTTPException as error:
            if error.status in (404, 405) and request.path.startswith("/api/"):
                log.warning("emulator has no route for %s %s", request.method, request.path)
            response = _json({"code": 0, "message": f"{error.status}: {error.reason}"}, error.status)
        if request.path.startswith("/api/"):
            self.calls.append(Call(request.method, path, response.status))
        self._bump()
        return response

    async def _body(self, request: web.Request) -> tuple[dict, dict[int, tuple[str, bytes, str]]]:
        """The JSON payload and uploaded files {index: (filename, bytes, content type)}."""
        if request.content_type != "multipart/form-data":
            raw = await request.read()
            return (json.loads(raw) if raw else {}), {}
        form = await request.post()
        payload_json = form.get("payload_json", "{}")
        payload = json.loads(payload_json if isinstance(payload_json, (str, bytes)) else "{}")
        files = {}
        for key, value in form.items():
            if key.startswith("files[") and isinstance(value, web.FileField):
                data = value.file.read()
                if len(data) > MAX_FILE_BYTES:
                    raise ApiError(413, 40005, "Request entity too large")
                files[int(key[6:-1])] = (value.filename, data, value.content_type)
        return payload, files

    def _validate(self, payload: dict) -> None:
        """The message limits Discord enforces (DISCORD.md §4)."""
        problems = []
        if len(payload.get("content") or "") > 2000:
            problems.append("content: must be 2000 or fewer in length")
        if len(payload.get("embeds") or []) > 10:
            problems.append("embeds: must be 10 or fewer in length")
        if len(payload.get("attachments") or []) > 10:
            problems.append("attachments: must be 10 or fewer in length")
        rows = payload.get("components") or []
        if not (payload.get("flags") or 0) & (1 << 15):
            if len(rows) > 5 or any(len(row.get("components", [])) > 5 for row in rows):
                problems.append("components: at most 5 rows of 5")
        if any(len(c["custom_id"]) > 100 for c in iter_components(rows) if "custom_id" in c):
            problems.append("custom_id: must be 100 or fewer in length")
        if problems:
            raise ApiError(400, 50035, "Invalid Form Body: " + "; ".join(problems))

    def _new_attachment(
        self, filename: str, data: bytes, content_type: str | None, description: str | None = None
    ) -> Attachment:
        if content_type in (None, "application/octet-stream"):
            content_type = None  # Discord works the type out itself (discord.py uploads say octet-stream)
        attachment = self.attachment(filename, data, content_type)
        attachment.description = description
        return attachment

    def _attachments(self, specs: list[dict] | None, files: dict, current: list[Attachment]) -> list[Attachment]:
        """The message's attachments after a create/edit: listed existing ones are kept, listed
        file indexes are uploaded; without a list, uploads are added to what was there."""
        if specs is None:
            return current + [self._new_attachment(n, d, ct) for n, d, ct in files.values()]
        existing = {str(a.id): a for a in current}
        result = []
        for spec in specs:
            key = str(spec["id"])
            if key in existing:
                result.append(existing[key])
            elif key.isdigit() and int(key) in files:
                name, data, content_type = files[int(key)]
                result.append(
                    self._new_attachment(spec.get("filename") or name, data, content_type, spec.get("description"))
                )
            else:
                raise ApiError(400, 50035, f"Invalid Form Body: attachments: unknown id {key}")
        return result

    async def _post_message(
        self, channel: Channel, payload: dict, files: dict, *, interaction: Interaction | None = None, flags: int = 0
    ) -> Message:
        self._validate(payload)
        message = Message(
            snowflake(),
            channel,
            self.bot_user,
            content=payload.get("content") or "",
            embeds=payload.get("embeds") or [],
            components=payload.get("components") or [],
            flags=(payload.get("flags") or 0) | flags,
            nonce=payload.get("nonce"),
            webhook_id=self.app_id if interaction else None,
            interaction=interaction,
            reference=payload.get("message_reference"),
            allowed_mentions=payload.get("allowed_mentions"),
            created_at=asyncio.get_running_loop().time(),
        )
        message.attachments = self._attachments(payload.get("attachments"), files, [])
        if not message.loading:
            self._ping(message)
        self.messages[message.id] = message
        if not message.ephemeral:
            await self._dispatch("MESSAGE_CREATE", message.payload())
        return message

    def _ping(self, message: Message) -> None:
        if message.ephemeral:
            return
        replied_to = None
        if message.reference and message.reference.get("message_id"):
            replied = self.messages.get(int(message.reference["message_id"]))
            replied_to = replied.author if replied is not None else None
        message.pinged_users, message.pinged_roles, message.pinged_everyone = compute_pings(
            message.content, message.allowed_mentions, message.channel.guild, self.users, replied_to
        )

    async def _edit(self, message: Message, payload: dict, files: dict) -> Message:
        if message.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        self._validate({"flags": message.flags, **payload})
        message.edits.append(message.payload())
        for key in ("content", "embeds", "components"):
            if key in payload:
                setattr(message, key, payload[key] or ("" if key == "content" else []))
        if "flags" in payload:
            message.flags = (message.flags & EPHEMERAL) | ((payload["flags"] or 0) & ~(EPHEMERAL | LOADING))
        message.flags &= ~LOADING
        if "allowed_mentions" in payload:
            message.allowed_mentions = payload["allowed_mentions"]
        if "attachments" in payload or files:
            message.attachments = self._attachments(payload.get("attachments"), files, message.attachments)
        if not message.ephemeral:
            await self._dispatch("MESSAGE_UPDATE", message.payload())
        return message

    async def _delete(self, message: Message) -> web.Response:
        if message.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        message.deleted = True
        if not message.ephemeral:
            await self._dispatch("MESSAGE_DELETE", self._delete_event(message))
        return web.Response(status=204)

    @staticmethod
    def _delete_event(message: Message) -> dict:
        event = {"id": str(message.id), "channel_id": str(message.channel.id)}
        if message.channel.guild is not None:
            event["guild_id"] = str(message.channel.guild.id)
        return event

    # ---------------------------------------------------------------- REST: identity and commands

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
            }
        )

    async def _me(self, request: web.Request) -> web.Response:
        return _json(self.bot_user.payload())

    async def _create_dm(self, request: web.Request) -> web.Response:
        """POST /users/@me/channels {recipient_id}: the DM channel with that user (made once)."""
        payload, _ = await self._body(request)
        user = self.users.get(int(payload.get("recipient_id") or 0))
        if user is None:
            raise ApiError(400, 50035, "Invalid Form Body: recipient_id: unknown user")
        return _json(self.dm_channel(user, create=True).payload())

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return _json(user.payload())

    async def _get_member(self, request: web.Request) -> web.Response:
        guild = next((g for g in self.guilds if g.id == int(request.match_info["guild_id"])), None)
        user = self.users.get(int(request.match_info["user_id"]))
        if guild is None or user is None:
            raise ApiError(404, 10007, "Unknown Member")
        return _json(guild.member_payload(user))

    async def _app_info(self, request: web.Request) -> web.Response:
        owner = User(self.app_id + 1, "owner").payload()
        return _json(
            {
                "id": str(self.app_id),
                "name": self.bot_user.name,
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": owner,
                "verify_key": "0" * 64,
                "flags": 0,
                "bot": self.bot_user.payload(),
            }
        )

    def _scope(self, request: web.Request) -> int | None:
        guild_id = request.match_info.get("guild_id")
        return int(guild_id) if guild_id else None

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json(self.commands.get(self._scope(request), []))

    async def _put_commands(self, request: web.Request) -> web.Response:
        commands = await request.json()
        problems = [p for command in commands for p in _command_problems(command, "/")]
        if problems:
            raise ApiError(400, 50035, "Invalid Form Body: " + "; ".join(problems))
        # Discord answers with every field; context menus have an empty description.
        commands = [
            {
                "description": "",
                **c,
                "id": str(snowflake()),
                "application_id": str(self.app_id),
                "version": str(snowflake()),
            }
            for c in commands
        ]
        scope = self._scope(request)
        if scope is not None:
            for command in commands:
                command["guild_id"] = str(scope)
        self.commands[scope] = commands
        return _json(commands)

    def _find_command(self, name: str, guild: Guild) -> tuple[dict, int | None] | None:
        for scope in (guild.id, None):
            for command in self.commands.get(scope, []):
                if command["name"] == name and command.get("type", 1) == 1:
                    return command, scope
        return None

    def command_names(self) -> list[str]:
        """The names of the commands the bot has synced (any scope)."""
        return sorted({c["name"] for commands in self.commands.values() for c in commands})

    @staticmethod
    def _option_spec(spec: dict, name: str, command: str) -> dict:
        for option in spec.get("options", []):
            if option["name"] == name:
                return option
        known = [o["name"] for o in spec.get("options", [])]
        raise LookupError(f"/{command} has no option {name!r}; it has {known}")

    def _resolve(self, value: Any, guild: Guild, resolved: dict[str, dict]) -> Any:
        """The option value as Discord sends it; objects go into `resolved`."""
        if isinstance(value, Attachment):
            resolved.setdefault("attachments", {})[str(value.id)] = value.payload()
            return str(value.id)
        if isinstance(value, User):
            resolved.setdefault("users", {})[str(value.id)] = value.payload()
            member = guild.member_payload(value, with_permissions=True)
            del member["user"]
            resolved.setdefault("members", {})[str(value.id)] = member
            return str(value.id)
        if isinstance(value, Channel):
            channel = {**value.payload(), "permissions": str(ALL_PERMISSIONS)}
            resolved.setdefault("channels", {})[str(value.id)] = channel
            return str(value.id)
        return value

    # ---------------------------------------------------------------- REST: interactions and webhooks

    def _interaction(self, token: str) -> Interaction:
        ix = self._by_token.get(token)
        if ix is None:
            raise ApiError(404, 10015, "Unknown Webhook")
        age = asyncio.get_running_loop().time() - ix.created_at
        if age > self.token_lifetime:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return ix

    async def _callback(self, request: web.Request) -> web.Response:
        ix = self.interactions.get(int(request.match_info["interaction_id"]))
        if ix is None or ix.token != request.match_info["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        payload, files = await self._body(request)
        now = asyncio.get_running_loop().time()
        if ix.response_type is not None:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        if now - ix.created_at > self.ack_deadline:
            raise ApiError(404, 10062, "Unknown interaction")
        kind, data = payload["type"], payload.get("data") or {}
        ephemeral = bool((data.get("flags") or 0) & EPHEMERAL)
        if kind == 7 and ix.message is None:
            raise ApiError(400, 50035, "Invalid Form Body: type 7 needs a message to update")
        ix.acked_at, ix.response_type, ix.response_data = now, kind, data
        if kind == 4:
            ix.original = await self._post_message(ix.channel, data, files, interaction=ix)
        elif kind == 5:
            ix.original = await self._post_message(
                ix.channel, {"flags": data.get("flags") or 0}, {}, interaction=ix, flags=LOADING
            )
        elif kind in (6, 7):
            ix.original = ix.message
            if kind == 7:
                await self._edit(ix.message, data, files)
        elif kind == 9:
            ix.modal = data
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        answer: dict[str, Any] = {"interaction": {"id": str(ix.id), "type": ix.type}}
        if ix.original is not None:
            answer["interaction"].update(
                response_message_id=str(ix.original.id),
                response_message_loading=kind == 5,
                response_message_ephemeral=ephemeral,
            )
        if kind in (4, 7):
            answer["resource"] = {"type": kind, "message": ix.original.payload()}
        return _json(answer)

    async def _followup(self, request: web.Request) -> web.Response:
        ix = self._interaction(request.match_info["token"])
        if ix.response_type is None:
            raise ApiError(404, 10015, "Unknown Webhook")  # a followup needs an ack first
        payload, files = await self._body(request)
        if (
            ix.original is not None
            and ix.original.loading
            and not ix.original.deleted
            and ix.original.interaction is ix
        ):
            # The first followup after a "thinking" defer replaces the loading message: same id,
            # the defer's ephemeral setting, and (like any edit) no notifications. Once the loading
            # message is deleted, a followup is a new message with its own flags.
            payload = {**payload, "flags": ix.original.flags & EPHEMERAL}
            return _json((await self._edit(ix.original, payload, files)).payload())
        message = await self._post_message(ix.channel, payload, files, interaction=ix)
        ix.followups.append(message)
        return _json(message.payload())

    async def _webhook_message(self, request: web.Request) -> web.Response:
        ix = self._interaction(request.match_info["token"])
        message_id = request.match_info["message_id"]
        if message_id == "@original":
            message = ix.original
        else:
            candidates = [ix.original, *ix.followups]
            message = next((m for m in candidates if m is not None and str(m.id) == message_id), None)
        if message is None or message.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        if request.method == "DELETE":
            return await self._delete(message)
        if request.method == "PATCH":
            payload, files = await self._body(request)
            await self._edit(message, payload, files)
        return _json(message.payload())

    # ---------------------------------------------------------------- REST: channels and messages

    def bot_permissions(self, channel: Channel) -> int:
        """What the bot may do in `channel`: @everyone's permissions and the overwrites (the bot
        holds no roles); everything in a DM channel."""
        if channel.guild is None:
            return ALL_PERMISSIONS
        return channel.guild.permissions_of(self.bot_user, channel)

    def _channel(self, request: web.Request, *, writing: bool = False) -> Channel:
        """The channel of the route; without View Channel there, Discord answers 50001 Missing Access."""
        channel_id = int(request.match_info["channel_id"])
        channel = next((c for g in self.guilds for c in g.channels if c.id == channel_id), None)
        if channel is None:
            channel = next((c for c in self.dm_channels.values() if c.id == channel_id), None)
        if channel is None or channel.deleted:
            raise ApiError(404, 10003, "Unknown Channel")
        if not self.bot_permissions(channel) & VIEW_CHANNEL:
            raise ApiError(403, 50001, "Missing Access")
        if writing and not channel.bot_allowed:
            raise ApiError(403, 50013, "Missing Permissions")
        return channel

    def _allowed_post(self, channel: Channel, payload: dict, files: dict) -> dict:
        """Discord's permission rules for a new channel message: Send Messages, and Attach Files
        for uploads (403 50013 without them); without Embed Links the embeds are dropped silently.
        Returns the payload as Discord would keep it."""
        perms = self.bot_permissions(channel)
        if not perms & SEND_MESSAGES or (files and not perms & ATTACH_FILES):
            raise ApiError(403, 50013, "Missing Permissions")
        if payload.get("embeds") and not perms & EMBED_LINKS:
            payload = {**payload, "embeds": []}
        return payload

    def _message(self, request: web.Request, channel: Channel) -> Message:
        message = self.messages.get(int(request.match_info["message_id"]))
        if message is None or message.deleted or message.channel is not channel or message.ephemeral:
            raise ApiError(404, 10008, "Unknown Message")
        return message

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json(self._channel(request).payload())

    async def _list_messages(self, request: web.Request) -> web.Response:
        messages = self.channel_messages(self._channel(request))
        if "before" in request.query:
            messages = [m for m in messages if m.id < int(request.query["before"])]
        if "after" in request.query:
            messages = [m for m in messages if m.id > int(request.query["after"])]
        limit = int(request.query.get("limit", 50))
        return _json([m.payload() for m in reversed(messages)][:limit])  # newest first

    async def _create_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request, writing=True)
        if channel.recipient is not None and channel.recipient.id in self.dms_blocked:
            raise ApiError(403, 50007, "Cannot send messages to this user")
        payload, files = await self._body(request)
        payload = self._allowed_post(channel, payload, files)
        nonce, now = payload.get("nonce"), asyncio.get_running_loop().time()
        if nonce is not None and payload.get("enforce_nonce"):
            # Discord returns the message already made with this nonce instead of a second one.
            seen = self._nonces.get(str(nonce))
            if seen is not None and now - seen[1] < self.nonce_window and not seen[0].deleted:
                return _json(seen[0].payload())
        message = await self._post_message(channel, payload, files)
        if nonce is not None and payload.get("enforce_nonce"):
            self._nonces[str(nonce)] = (message, now)
        return _json(message.payload())

    async def _get_message(self, request: web.Request) -> web.Response:
        return _json(self._message(request, self._channel(request)).payload())

    async def _edit_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request, writing=True)
        message = self._message(request, channel)
        if message.author is not self.bot_user:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        payload, files = await self._body(request)
        return _json((await self._edit(message, payload, files)).payload())

    async def _delete_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request, writing=True)
        return await self._delete(self._message(request, channel))

    async def _bot_reaction(self, request: web.Request) -> web.Response:
        channel = self._channel(request, writing=True)
        message = self._message(request, channel)
        emoji = request.match_info["emoji"]
        user_id = request.match_info.get("user_id", "@me")
        if request.method == "PUT":
            await self._add_reaction(self.bot_user, message, emoji)
        else:
            user = self.bot_user if user_id == "@me" else self.users.get(int(user_id))
            if user is not None:
                await self._remove_reaction(user, message, emoji)
        return web.Response(status=204)

    async def _cdn(self, request: web.Request) -> web.Response:
        attachment = self.attachments.get(int(request.match_info["attachment_id"]))
        if attachment is None or attachment.filename != request.match_info["filename"]:
            raise web.HTTPNotFound()
        attachment.fetches += 1
        # Served as uploaded, whatever the uploader claimed (even "text/plain; charset=x").
        content_type = attachment.content_type or "application/octet-stream"
        return web.Response(body=attachment.data, headers={"Content-Type": content_type})
