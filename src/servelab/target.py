"""A measured target: who serves (identity), on which stack, and the fingerprint a baseline
must match — fixed once, the moment its server is ready, and carried from there on.

Judging a figure, writing the record and updating a baseline all read the target; nothing
downstream collects the stack or hashes the weights again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from servelab.baselines import Fingerprint
from servelab.errors import RecordError
from servelab.figures import Identity
from servelab.hardware import HostIdentity, StackIdentity, collect_stack, patches_digest

if TYPE_CHECKING:
    from servelab.profiles import Profile

EXTERNAL_NOTE = "external endpoint: server flags unknown"


@dataclass(frozen=True)
class Target:
    """One measured target (a profile, or an external endpoint)."""

    identity: Identity
    fingerprint: Fingerprint
    stack: StackIdentity
    startup_seconds: float | None = None
    notes: tuple[str, ...] = ()

    # The names the record's writer reads (profile, model, engine, quantization).
    @property
    def profile(self) -> str:
        return self.identity.profile

    @property
    def model(self) -> str:
        return self.identity.model

    @property
    def engine(self) -> str:
        return self.identity.engine

    @property
    def quantization(self) -> str | None:
        return self.stack.quantization

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": asdict(self.identity),
            "fingerprint": asdict(self.fingerprint),
            "stack": self.stack.to_dict(),
            "startup_seconds": self.startup_seconds,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Target:
        try:
            s = dict(d["stack"])
            stack = StackIdentity(
                **{
                    **s,
                    "patches": tuple((p["file"], p["sha256"]) for p in s["patches"]),
                    "env": dict(s["env"]),
                    "command": tuple(s["command"]),
                }
            )
            seconds = d["startup_seconds"]
            return cls(
                Identity(**d["identity"]),
                Fingerprint(**d["fingerprint"]),
                stack,
                None if seconds is None else float(seconds),
                tuple(str(n) for n in d["notes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"saved target is malformed ({exc!r})") from None


def make_target(
    identity: Identity,
    profile: Profile | None,
    host: HostIdentity | None,
    *,
    weights_sha256: str | None = None,
    startup_seconds: float | None = None,
    command: Sequence[str] | None = None,
) -> Target:
    """The target of a server that is ready: its stack (without re-hashing the weights: the
    pool's prepared model already knows their hash) and the fingerprint built from it."""
    stack = collect_stack(profile, identity.engine, weights=False, command=command)
    if weights_sha256:
        stack = replace(stack, weights_sha256=weights_sha256)
    fingerprint = Fingerprint(
        host_key=identity.host,
        engine=identity.engine,
        model=identity.model,
        args_hash=stack.args_hash,
        weights_sha256=stack.weights_sha256,
        driver=host.drivers() if host is not None and host.accelerators else None,
        patches=patches_digest(stack),
    )
    notes = () if profile is not None else (EXTERNAL_NOTE,)
    return Target(identity, fingerprint, stack, startup_seconds, notes)
