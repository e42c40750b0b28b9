"""The Relocation Manager's TOML configuration, validated with clear messages.

Example (one device of the namespace testbed)::

    device = "ed"
    adapters = ["application", "net_addr", "tcp", "udp"]   # udp may be left out

    [r]                          # interface R: where this RM listens for other RMs
    listen = "2001:db8:1::2"
    port = 4700

    [network]                    # address takeover on one link
    interface = "eth0"
    pool = ["2001:db8:1::100/64", "192.0.2.100/24"]

    [devices.id]                 # peers, until discovery exists
    host = "2001:db8:1::3"
    port = 4700

    [apps]
    allowed_uids = [1000]        # besides root, who may connect applications / controllers

    [importers.echo]             # launched when a session of this type arrives and no
    command = ["sessmob", "app", "echo", "serve", "--import-only", "--rm-socket",
               "{state_dir}/app.sock"]
    user = "nobody"              # importer is running; never root when set

    [limits]
    reservation_timeout = 5.0    # s: no transfer or activation after this (a lease)
    peer_timeout = 2.0           # s: per R request
    app_timeout = 2.0            # s: per application request
    max_document = 268435456     # bytes of one exchange document

    [moves]
    keep_cpus_awake = "during-moves"  # a 0 µs CPU latency request (PM QoS) makes idle CPUs
                                 # poll instead of sleeping: "during-moves" (from the
                                 # reservation to the end of the freeze window), "always"
                                 # (while the RM runs: faster and steadier moves, at the cost
                                 # of CPUs that never sleep) or "never" (sessmob/cpu_awake.py)

    [faults]                     # fault injection for tests only
    fail = ["export:tcp.get_state"]   # make this adapter primitive raise; also
                                 # "import:rm.activated_reply" (activate, lose the reply),
                                 # "import:rm.stall" (hang 3 s on a transfer),
                                 # "import:rm.slow_activation" (activate 2.5 s late) and
                                 # "import:rm.deaf_after_activation" (activate, then lose
                                 # the reply and stop listening for 3 s),
                                 # "import:rm.crash_after_activation" (exit before replying)
    delay_after_check = 0.0      # s to wait after CheckPreconditions (reservation expiry)
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ALL_ADAPTERS = ("application", "net_addr", "tcp", "udp")
REQUIRED_ADAPTERS = ("application", "net_addr", "tcp")
CPUS_AWAKE = ("during-moves", "always", "never")


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key and the problem."""


@dataclass(frozen=True)
class PeerDevice:
    name: str
    host: str
    port: int


@dataclass(frozen=True)
class Importer:
    command: list[str]
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    device: str
    state_dir: str
    listen: str
    port: int
    interface: str
    pool: list[str]
    devices: dict[str, PeerDevice]
    allowed_uids: set[int]
    importers: dict[str, Importer]
    reservation_timeout: float = 5.0
    peer_timeout: float = 2.0
    app_timeout: float = 2.0
    max_document: int = 256 << 20
    adapters: tuple[str, ...] = ("application", "net_addr", "tcp", "udp")
    keep_cpus_awake: str = "during-moves"  # one of CPUS_AWAKE
    # Fault injection for the tests of the failure paths; never set in production.
    faults: frozenset[str] = frozenset()  # "export:tcp.get_state", "import:application.set_state"
    delay_after_check: float = 0.0  # s the exporter waits after CheckPreconditions


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing key {key!r}")
    v = d[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise ConfigError(f"{where}.{key}: expected {kind}, got {type(v).__name__}")
    return v


def _port(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
        raise ConfigError(f"{where}: port must be 1..65535, got {v!r}")
    return v


def _host(v: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ConfigError(f"{where}: {v!r} is not an IP address") from None


def parse(data: dict[str, Any], state_dir: str) -> Config:
    """Validate a decoded TOML document."""
    device = _get(data, "device", str, "config")
    if not _NAME.match(device):
        raise ConfigError(f"config.device: {device!r} must be 1-64 of [A-Za-z0-9_.-]")
    r = _get(data, "r", dict, "config")
    net = _get(data, "network", dict, "config")
    pool = _get(net, "pool", list, "network")
    for p in pool:
        try:
            ipaddress.ip_interface(p)
        except (ValueError, TypeError):
            raise ConfigError(f"network.pool: {p!r} is not addr/prefixlen") from None
        if "/" not in str(p):
            raise ConfigError(f"network.pool: {p!r} needs a prefix length")
    devices = {}
    for name, d in data.get("devices", {}).items():
        if not _NAME.match(name) or not isinstance(d, dict):
            raise ConfigError(f"devices.{name}: bad device entry")
        devices[name] = PeerDevice(
            name, _host(_get(d, "host", str, f"devices.{name}"), f"devices.{name}.host"),
            _port(d.get("port", 4700), f"devices.{name}.port"),
        )  # fmt: skip
    apps = data.get("apps", {})
    uids = apps.get("allowed_uids", [])
    if not isinstance(uids, list) or not all(isinstance(u, int) and u >= 0 for u in uids):
        raise ConfigError("apps.allowed_uids: a list of uids")
    importers = {}
    for typ, spec in data.get("importers", {}).items():
        cmd = _get(spec, "command", list, f"importers.{typ}")
        if not cmd or not all(isinstance(c, str) for c in cmd):
            raise ConfigError(f"importers.{typ}.command: a non-empty list of strings")
        user = spec.get("user")
        if user is not None and (not isinstance(user, str) or user == "root"):
            raise ConfigError(f"importers.{typ}.user: a non-root user name")
        env = spec.get("env", {})
        importers[typ] = Importer([c.replace("{state_dir}", state_dir) for c in cmd], user, {**env})
    limits = data.get("limits", {})

    def num(key: str, default: float) -> float:
        v = limits.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"limits.{key}: a positive number, got {v!r}")
        return float(v)

    adapters = data.get("adapters", list(ALL_ADAPTERS))
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise ConfigError("adapters: a list of adapter names")
    unknown = set(adapters) - set(ALL_ADAPTERS)
    if unknown:
        raise ConfigError(f"adapters: unknown {sorted(unknown)} (known: {list(ALL_ADAPTERS)})")
    missing = set(REQUIRED_ADAPTERS) - set(adapters)
    if missing:
        raise ConfigError(
            f"adapters: {sorted(missing)} cannot be disabled (the RM moves TCP sessions by "
            "address takeover; udp is optional)"
        )
    moves = data.get("moves", {})
    if not isinstance(moves, dict):
        raise ConfigError("moves: a table")
    awake = moves.get("keep_cpus_awake", "during-moves")
    if awake not in CPUS_AWAKE:
        raise ConfigError(f"moves.keep_cpus_awake: one of {', '.join(CPUS_AWAKE)}; got {awake!r}")
    faults = data.get("faults", {})
    fail = faults.get("fail", [])
    if not isinstance(fail, list) or not all(isinstance(f, str) for f in fail):
        raise ConfigError("faults.fail: a list of 'export:ADAPTER.PRIMITIVE' strings")
    delay = faults.get("delay_after_check", 0.0)
    if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
        raise ConfigError("faults.delay_after_check: a number of seconds >= 0")

    return Config(
        device=device,
        state_dir=state_dir,
        listen=_host(_get(r, "listen", str, "r"), "r.listen"),
        port=_port(r.get("port", 4700), "r.port"),
        interface=_get(net, "interface", str, "network"),
        pool=[str(p) for p in pool],
        devices=devices,
        allowed_uids=set(uids),
        importers=importers,
        reservation_timeout=num("reservation_timeout", 5.0),
        peer_timeout=num("peer_timeout", 2.0),
        app_timeout=num("app_timeout", 2.0),
        max_document=int(num("max_document", 256 << 20)),
        adapters=tuple(a for a in ALL_ADAPTERS if a in adapters),
        keep_cpus_awake=awake,
        faults=frozenset(fail),
        delay_after_check=float(delay),
    )


def load(path: str, state_dir: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: {e}") from None
    return parse(data, state_dir)
