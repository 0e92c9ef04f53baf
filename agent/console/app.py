"""The console's web application (Starlette + Jinja2, htmx and uPlot vendored under static/).

Why these: Starlette is a small, well-kept ASGI toolkit (sessions, static files, streaming
responses) with no ORM or framework we do not need; uvicorn serves it; Jinja2 escapes by default;
htmx keeps the pages server-rendered with a few attributes instead of a JavaScript build; uPlot draws
hours of per-minute data in a few kilobytes. Every asset is in the wheel: the console works with no
internet and with the central broker down.

Data: one ``Hub`` task asks the agent for its status once a second over the control socket and fans
it out to every open page (server-sent events), so ten open browsers cost the agent what one costs;
search, a parcel's chain, flagged images and stats are read from the journal in outbox.sqlite.

Security (docs/operations.md, "The console"): logins from ``console.users_file`` (scrypt hashes),
roles viewer / officer / technician, a CSRF token on every POST, HttpOnly SameSite=Strict session
cookies (Secure with TLS), a restrictive Content-Security-Policy, every action logged and published
as an ``audit`` alarm by the agent. The console can never release a parcel or change a verdict: the
control socket has no such operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.config import Config, ConfigError, load_config
from agent.console.alarm_help import alarm_help
from agent.console.journal import Journal
from agent.console.users import User, load_users, verify
from agent.service.control import request as control_request
from agent.service.control import socket_path
from agent.service.local import FINDING_OUTCOMES

log = structlog.get_logger("sortgate.console")

HERE = Path(__file__).resolve().parent
#: how often the hub asks the agent for its status (one request for all open pages)
HUB_PERIOD_S = 1.0
SESSION_S = 12 * 3600
STATS_TTL_S = 20.0
#: the agent's control socket: how long the hub waits for a status
STATUS_TIMEOUT_S = 5.0
#: a status asked for before the console has fetched its first waits this long for it (the first
#: fetch's own time-out, and a little more)
FIRST_STATUS_WAIT_S = STATUS_TIMEOUT_S + 1.0
MAX_POST = 16 * 1024  # the longest form (a finding with its note) is far below this
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


class Hub:
    """The agent's status, fetched once a second, for every open page."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.latest: dict[str, Any] = {"ok": False, "error": "not asked yet"}
        self.frame = b""  # ``latest`` as one server-sent event, encoded once for every client
        self.version = 0
        self._changed = asyncio.Condition()
        self.clients = 0

    async def run(self) -> None:
        while True:
            try:
                reply = await asyncio.to_thread(
                    control_request, self.sock, {"op": "status", "parcels": 20}, STATUS_TIMEOUT_S
                )
            except (OSError, ValueError) as exc:
                reply = {"ok": False, "error": f"the agent does not answer on {self.sock}: {exc}"}
            reply["fetched_at"] = time.time()
            frame = b"data: " + json.dumps(reply, separators=(",", ":")).encode() + b"\n\n"
            async with self._changed:
                self.latest, self.frame, self.version = reply, frame, self.version + 1
                self._changed.notify_all()
            await asyncio.sleep(HUB_PERIOD_S)

    async def current(self, wait_s: float) -> dict[str, Any]:
        """The latest status; right after the console starts, before the first has been fetched,
        wait for it (at most ``wait_s``) rather than answer 'not asked yet'."""
        if self.version == 0:
            try:
                async with asyncio.timeout(wait_s), self._changed:
                    await self._changed.wait_for(lambda: self.version > 0)
            except TimeoutError:
                pass
        return self.latest

    async def updates(self) -> AsyncIterator[bytes]:
        """Each new status as an encoded server-sent event."""
        seen = 0
        while True:
            async with self._changed:
                while self.version == seen:
                    await self._changed.wait()
                seen, frame = self.version, self.frame
            yield frame

    async def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(control_request, self.sock, req, 10.0)
        except (OSError, ValueError) as exc:
            return {"ok": False, "error": f"the agent does not answer: {exc}"}


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
                    (b"cache-control", b"no-store"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _when(value: Any) -> str:
    """An ISO time or epoch seconds as local time of day with milliseconds (date when not today)."""
    if value is None or value == "":
        return "-"
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else (
            datetime.fromtimestamp(float(value), UTC))
    except (ValueError, TypeError):
        return str(value)
    local = t.astimezone()
    fmt = "%H:%M:%S" if local.date() == datetime.now().astimezone().date() else "%Y-%m-%d %H:%M:%S"
    return local.strftime(fmt) + f".{local.microsecond // 1000:03d}"


class Console:
    """The console's state and its request handlers (routes in ``app``)."""

    def __init__(self, cfg: Config, config_path: Path) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.state_dir = Path(cfg.storage.state_dir)
        self.hub = Hub(socket_path(self.state_dir, cfg.control.socket))
        self.journal = Journal(self.state_dir)
        self.users: dict[str, User] = load_users(cfg.console.users_file) if cfg.console.users_file else {}
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["when"] = _when
        self.keep_dir = Path(cfg.vision.keep_dir).resolve()
        self.gates = [(lane.gate, lane.number, lane.role) for lane in cfg.lanes if lane.gate is not None]
        self._stats_cache: dict[float, tuple[float, dict[str, Any]]] = {}
        self._stats_lock = asyncio.Lock()

    def _config_on_disk(self) -> tuple[str, Config | None, list[str]]:
        try:
            text = self.config_path.read_text(encoding="utf-8")
        except OSError as exc:
            return "", None, [f"{self.config_path}: {exc}"]
        try:
            return text, load_config(self.config_path), []
        except ConfigError as exc:
            return text, None, exc.problems

    def user_of(self, request: Request) -> User | None:
        name = request.session.get("user")
        if not name or name not in self.users:
            return None
        if time.time() - float(request.session.get("since", 0)) > SESSION_S:
            request.session.clear()
            return None
        return self.users[name]

    def csrf_token(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(24)
        return str(token)

    def page(self, request: Request, name: str, **ctx: Any) -> Response:
        user = self.user_of(request)
        if self.users and user is None:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return self.templates.TemplateResponse(request, name, {
            "user": user, "logins": bool(self.users), "csrf": self.csrf_token(request), "version": __version__,
            "site": self.cfg.line.site, "line": self.cfg.line.line, "status": self.hub.latest,
            "path": request.url.path, **ctx,
        })

    async def checked(self, request: Request, action: str) -> tuple[User, dict[str, str]]:
        """A POST: the CSRF token first (nothing is acted on before it matches), then the role."""
        if int(request.headers.get("content-length") or 0) > MAX_POST:
            raise HTTPException(413, f"a console form is at most {MAX_POST} bytes")
        form = await request.form(max_files=0, max_fields=20)
        sent = request.headers.get("x-csrf-token") or str(form.get("csrf", ""))
        token = request.session.get("csrf")
        if not token or not hmac.compare_digest(sent.encode(), str(token).encode()):
            log.warning("console POST refused: CSRF token missing or wrong", path=request.url.path)
            raise HTTPException(403, "CSRF token missing or wrong: reload the page and try again")
        user = self.user_of(request)
        if user is None:
            raise HTTPException(
                403, "log in first" if self.users else "this console has no users_file: it is read-only"
            )
        if not user.can(action):
            log.warning("console action refused: role", user=user.name, role=user.role, action=action)
            raise HTTPException(403, f"{user.role} may not {action}")
        return user, {k: str(v) for k, v in form.items()}

    # --- pages --------------------------------------------------------------------------------
    async def line_page(self, request: Request) -> Response:
        return self.page(request, "line.html")

    async def readers_page(self, request: Request) -> Response:
        return self.page(request, "readers.html")

    async def alarms_page(self, request: Request) -> Response:
        return self.page(request, "alarms.html", help=alarm_help())

    async def stats_page(self, request: Request) -> Response:
        return self.page(request, "stats.html")

    async def parcels_page(self, request: Request) -> Response:
        q = request.query_params.get("q", "")[:64]
        results = await asyncio.to_thread(self.journal.search, q) if q else []
        if len(results) == 1 and request.query_params.get("go") == "1":
            return RedirectResponse(f"/parcels/{results[0]['record_id']}", status_code=303)
        return self.page(request, "parcels.html", q=q, results=results)

    async def parcel_page(self, request: Request) -> Response:
        rid = request.path_params["record_id"]
        rec = await asyncio.to_thread(self.journal.parcel, rid)
        if rec is None:
            raise HTTPException(404, f"no parcel record {rid} in the local journal")
        findings = await asyncio.to_thread(self.journal.findings, rid)
        pending = await asyncio.to_thread(self.journal.pending, rid)
        return self.page(request, "parcel.html", rec=rec, findings=findings, pending=pending,
                         outcomes=FINDING_OUTCOMES, image_ok=self._image_path(rec) is not None)

    async def review_page(self, request: Request) -> Response:
        flagged = await asyncio.to_thread(self.journal.flagged)
        return self.page(request, "review.html", flagged=flagged)

    async def bench_page(self, request: Request) -> Response:
        waybill = request.query_params.get("waybill", "").strip()[:64]
        rec = await asyncio.to_thread(self.journal.latest_by_waybill, waybill) if waybill else None
        findings = await asyncio.to_thread(self.journal.findings, rec["record_id"]) if rec else []
        return self.page(request, "bench.html", waybill=waybill, rec=rec, findings=findings,
                         outcomes=FINDING_OUTCOMES, image_ok=rec is not None and self._image_path(rec) is not None)

    async def commissioning_page(self, request: Request) -> Response:
        text, on_disk, problems = await asyncio.to_thread(self._config_on_disk)
        from agent.service.runtime import config_hash

        running = (self.hub.latest.get("agent") or {}).get("config_hash")
        same = on_disk is not None and running == config_hash(on_disk)
        return self.page(request, "commissioning.html", config_text=text, problems=problems, same=same,
                         running_hash=running, gates=self.gates, config_path=str(self.config_path))

    # --- login --------------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        if request.method == "GET":
            return self.templates.TemplateResponse(request, "login.html", {
                "csrf": self.csrf_token(request), "error": None, "next": request.query_params.get("next", "/"),
                "logins": bool(self.users), "user": None, "site": self.cfg.line.site, "line": self.cfg.line.line,
                "version": __version__, "path": "/login", "status": self.hub.latest,
            })
        if int(request.headers.get("content-length") or 0) > MAX_POST:
            raise HTTPException(413, f"a console form is at most {MAX_POST} bytes")
        form = await request.form(max_files=0, max_fields=20)
        sent = str(form.get("csrf", ""))
        token = str(request.session.get("csrf", ""))
        if not token or not hmac.compare_digest(sent.encode(), token.encode()):
            raise HTTPException(403, "CSRF token missing or wrong: reload the page and try again")
        name, password = str(form.get("user", ""))[:32], str(form.get("password", ""))
        user = self.users.get(name)
        ok = await asyncio.to_thread(verify, user, password)
        if not ok:
            await self.hub.ask({"op": "audit", "action": "login_failed", "user": name or "?"})
            await asyncio.sleep(0.5)  # a brute-force attempt gains nothing from speed
            return self.templates.TemplateResponse(request, "login.html", {
                "csrf": self.csrf_token(request), "error": "wrong user name or password", "next": "/",
                "logins": bool(self.users), "user": None, "site": self.cfg.line.site, "line": self.cfg.line.line,
                "version": __version__, "path": "/login", "status": self.hub.latest,
            }, status_code=401)
        request.session.clear()  # a new session id for a new login (no fixation)
        request.session.update(user=name, since=time.time(), csrf=secrets.token_urlsafe(24))
        await self.hub.ask({"op": "audit", "action": "login", "user": name})
        nxt = str(form.get("next", "/"))
        return RedirectResponse(nxt if nxt.startswith("/") and not nxt.startswith("//") else "/", status_code=303)

    async def logout(self, request: Request) -> Response:
        user, _ = await self.checked(request, "view")
        await self.hub.ask({"op": "audit", "action": "logout", "user": user.name})
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- actions ------------------------------------------------------------------------------
    def result(self, request: Request, reply: dict[str, Any], done: str) -> Response:
        ok = bool(reply.get("ok"))
        text = done if ok else f"refused: {reply.get('error')}"
        if request.headers.get("hx-request"):
            return self.templates.TemplateResponse(request, "_result.html", {"ok": ok, "text": text},
                                              status_code=200 if ok else 409)
        return JSONResponse({"ok": ok, "text": text, **reply}, status_code=200 if ok else 409)

    async def act_maintenance(self, request: Request) -> Response:
        user, form = await self.checked(request, "maintenance")
        mode = "maintenance" if form.get("state") == "on" else "normal"
        reply = await self.hub.ask({"op": "set_mode", "mode": mode, "user": user.name, "via": "console"})
        return self.result(request, reply, f"mode {reply.get('mode')}")

    async def act_gate(self, request: Request) -> Response:
        user, form = await self.checked(request, "gate")
        try:
            gate = int(form.get("gate", ""))
        except ValueError:
            raise HTTPException(400, "gate must be a number") from None
        reply = await self.hub.ask({"op": "fire_gate", "gate": gate, "user": user.name, "via": "console"})
        return self.result(request, reply, f"gate {gate} fired (cleared in {reply.get('cleared_ms')} ms)")

    async def act_reader_reset(self, request: Request) -> Response:
        user, form = await self.checked(request, "reader")
        reply = await self.hub.ask({"op": "reader_reset", "reader": form.get("reader") or None,
                                    "user": user.name, "via": "console"})
        return self.result(request, reply, f"counters reset ({reply.get('reset')})")

    async def act_finding(self, request: Request) -> Response:
        user, form = await self.checked(request, "finding")
        reply = await self.hub.ask({
            "op": "finding", "parcel_record_id": form.get("parcel_record_id", ""), "outcome": form.get("outcome"),
            "note": form.get("note", ""), "user": user.name,
        })
        return self.result(request, reply, f"finding {form.get('outcome')} recorded ({reply.get('finding_id')})")

    # --- data ---------------------------------------------------------------------------------
    def _image_path(self, rec: dict[str, Any]) -> Path | None:
        """A kept image of the record, only from inside vision.keep_dir."""
        raw = (rec.get("image") or {}).get("path")
        if not raw:
            return None
        path = Path(raw).resolve()
        if not path.is_relative_to(self.keep_dir) or not path.is_file():
            return None
        return path

    async def image(self, request: Request) -> Response:
        if self.users and self.user_of(request) is None:
            raise HTTPException(403, "log in first")
        rec = await asyncio.to_thread(self.journal.parcel, request.path_params["record_id"])
        path = self._image_path(rec) if rec else None
        if path is None:
            raise HTTPException(404, "no kept image for this parcel")
        return FileResponse(path)

    async def api_status(self, request: Request) -> Response:
        if self.users and self.user_of(request) is None:
            raise HTTPException(403, "log in first")
        return JSONResponse(await self.hub.current(FIRST_STATUS_WAIT_S))

    async def api_stats(self, request: Request) -> Response:
        if self.users and self.user_of(request) is None:
            raise HTTPException(403, "log in first")
        try:
            hours = min(48.0, max(0.1, float(request.query_params.get("hours", "6"))))
        except ValueError:
            hours = 6.0
        return JSONResponse(await self._stats(round(hours, 1)))

    async def _stats(self, hours: float) -> dict[str, Any]:
        """Per-minute stats change once a minute: computed at most every STATS_TTL_S per span,
        however many pages ask (one scan of the journal, not one per open Stats page)."""
        now = time.monotonic()
        cached = self._stats_cache.get(hours)
        if cached is not None and now - cached[0] < STATS_TTL_S:
            return cached[1]
        async with self._stats_lock:  # a burst of pages waits for one scan
            cached = self._stats_cache.get(hours)
            if cached is None or now - cached[0] >= STATS_TTL_S:
                cached = (time.monotonic(), await asyncio.to_thread(self.journal.stats, hours))
                self._stats_cache[hours] = cached
        return cached[1]

    async def events(self, request: Request) -> Response:
        if self.users and self.user_of(request) is None:
            raise HTTPException(403, "log in first")

        async def stream() -> AsyncIterator[bytes]:
            self.hub.clients += 1
            try:
                yield b"retry: 2000\n\n"
                async for frame in self.hub.updates():
                    yield frame
            finally:
                self.hub.clients -= 1

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(self.hub.run(), name="hub")
        log.info("console serving", host=self.cfg.console.host, port=self.cfg.console.port, users=len(self.users))
        try:
            yield
        finally:
            task.cancel()

    def app(self) -> Starlette:
        secret = _session_secret(self.state_dir)
        routes = [
            Route("/", self.line_page), Route("/readers", self.readers_page), Route("/alarms", self.alarms_page),
            Route("/stats", self.stats_page), Route("/parcels", self.parcels_page),
            Route("/parcels/{record_id:path}", self.parcel_page), Route("/review", self.review_page),
            Route("/bench", self.bench_page), Route("/commissioning", self.commissioning_page),
            Route("/login", self.login_page, methods=["GET", "POST"]), Route("/logout", self.logout, methods=["POST"]),
            Route("/actions/maintenance", self.act_maintenance, methods=["POST"]),
            Route("/actions/gate", self.act_gate, methods=["POST"]),
            Route("/actions/reader_reset", self.act_reader_reset, methods=["POST"]),
            Route("/actions/finding", self.act_finding, methods=["POST"]),
            Route("/image/{record_id:path}", self.image), Route("/api/status", self.api_status),
            Route("/api/stats", self.api_stats),
            Route("/events", self.events), Route("/favicon.ico", lambda request: Response(status_code=204)),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]
        middleware = [
            Middleware(SecurityHeaders),
            Middleware(SessionMiddleware, secret_key=secret, session_cookie="sortgate_console", max_age=SESSION_S,
                       same_site="strict", https_only=self.cfg.console.tls_cert is not None),
        ]
        app = Starlette(routes=routes, middleware=middleware, lifespan=self.lifespan)
        app.state.hub = self.hub
        return app


def create_app(cfg: Config, config_path: Path) -> Starlette:
    return Console(cfg, config_path).app()


def _session_secret(state_dir: Path) -> str:
    """The key that signs session cookies: made once, kept in the state folder (0600), so a
    restarted console keeps its sessions and no two boxes share one."""
    path = state_dir / "console.secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key


def serve(cfg: Config, config_path: Path) -> int:
    import uvicorn

    app = create_app(cfg, config_path)
    c = cfg.console
    server = uvicorn.Server(uvicorn.Config(
        app, host=c.host, port=c.port, log_level="warning", access_log=False, proxy_headers=False,
        ssl_certfile=str(c.tls_cert) if c.tls_cert else None, ssl_keyfile=str(c.tls_key) if c.tls_key else None,
    ))
    server.run()
    return 0


__all__ = ["Hub", "create_app", "serve"]
