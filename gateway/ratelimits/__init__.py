"""Per-token rate limits and quotas: the policy (policy.py), the decision in-process (local.py) or shared
through Redis in one script (shared.py), and the IETF RateLimit header fields (headers.py)."""
