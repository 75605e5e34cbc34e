"""Budget a replica holds for a busy token far below its limits: one check in Redis takes a share of the
token's free rate and quota at once, and the replica spends it in the process, so that such a token costs one
Redis check per lease rather than one per request.

This is Envoy's rate limit quota service idea (a server hands each proxy an assignment with a lifetime),
granted by the limits script itself (shared.py): after allowing a request it may debit `want` more units, at
most one sixteenth (LEASE_SHARE) of what is still free, of the rate and of the quota alike. So near a limit
nothing is leased: with fewer than 16 requests' worth free, every request is one check in Redis, exactly as
without leases, and two replicas can still never both spend the last request. A replica asks for half
what the token used here in the last LEASE_SECONDS (at most MAX_LEASE), and only when that is at least
MIN_LEASE: a lease pays for a busy token only, and one that lasts about half its time leaves little to lapse
at its end. It spends a lease for at most LEASE_SECONDS.

A lease never admits more than the limit allows: its units are debited in Redis before they are spent. What
it changes:
- a rate unit may be spent up to LEASE_SECONDS after its debit, so a window can see at most one lease more
  than GCRA's schedule (a lease is at most 1/16 of the budget that was free);
- units left unspent: the rate's lapse when the lease ends (they come back as the budget refills); the
  quota's are given back to Redis (its counter is then as if they were never taken) when the lease ends,
  when the token's limits or period change, and when the process closes. While Redis does not answer, a
  give-back is lost.
- the RateLimit fields of a request served from a lease are this replica's view: the budget at the grant,
  less what this replica spent since.

`limit_leases = false` turns them off: every request of a limited token is one check in Redis.
"""

from __future__ import annotations

from typing import Any

LEASE_SECONDS = 0.25
LEASE_SHARE = 16  # a lease is at most 1/LEASE_SHARE of the free budget (the script's own constant)
MIN_LEASE = 8  # the least worth asking for: a token doing 16 requests here per LEASE_SECONDS (64 a second)
MAX_LEASE = 1000


class Lease:
    """One token's lease in this process, for one `_Call` of the script (its limits and quota period).

    `ahead` is how far Redis's TAT was ahead of the grant's time `granted` (seconds since EPOCH) just after
    it, and `used` its quota count, the lease's units included (kept relative: a TAT of 2027 in seconds has
    an ulp of a few nanoseconds, too coarse for a 10 µs interval). `served` counts this token's requests here
    since `period_start`, `recent` those of the period of LEASE_SECONDS before: what the next lease is sized
    by, so that it lasts about as long as it may."""

    __slots__ = (
        "ahead",
        "asking",
        "call",
        "expires",
        "granted",
        "period_start",
        "recent",
        "served",
        "units",
        "used",
    )

    def __init__(self, call: Any, now: float) -> None:
        self.call = call
        self.units = 0
        self.expires = -1.0  # the gateway clock's time after which the units are not spent
        self.granted = 0.0
        self.ahead = 0.0
        self.used = 0
        self.period_start = now
        self.served = 0
        self.recent = 0
        self.asking = False  # a check that may grant units is in flight: the others ask for none

    def want(self, now: float) -> int:
        """Units to ask for with the next check in Redis: half what this token used here in the last
        LEASE_SECONDS, when that is at least MIN_LEASE."""
        elapsed = now - self.period_start
        if elapsed >= LEASE_SECONDS:  # a new period, which the asking request (counted already) opens
            self.recent = self.served - 1 if elapsed < 2 * LEASE_SECONDS else 0  # else idle meanwhile
            self.served, self.period_start = 1, now
        units = max(self.recent, self.served) // 2  # lasts half a period: little is left to lapse at its end
        return min(MAX_LEASE, units) if units >= MIN_LEASE else 0

    def grant(self, units: int, ahead: float, used: int, now: float, since_epoch: float) -> None:
        """Only the asking check grants, after what an earlier lease left was given back: none is held."""
        self.units = units
        self.granted, self.ahead, self.used = since_epoch, ahead, used
        self.expires = now + LEASE_SECONDS

    def spend(self, since_epoch: float, interval: float) -> tuple[float, int]:
        """One request from the lease at `since_epoch`: (the TAT it found less now, in seconds; the quota
        count after it), as Redis would have answered had the lease's other units not been taken."""
        units = self.units
        self.units = units - 1
        self.served += 1
        found = self.ahead - units * interval - (since_epoch - self.granted)
        return (found if found > 0.0 else 0.0), self.used - units + 1  # noqa: FURB136 (no builtin call)
