"""Per-token rate limits and quotas: the policy (policy.py), GCRA and the in-process counts (gcra.py), the
same decision shared through Redis in one script (shared.py, on the connection of pipe.py), the IETF
RateLimit header fields (headers.py), and the check the proxy and forward-auth call (limiter.py)."""
