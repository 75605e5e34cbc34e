"""The admin command line: `gateway tokens ...` and `gateway admin-keys ...` over the admin API's HTTP.

A client of the admin API like any other: it imports neither plane (nor anything of gateway/), so what it
can do is exactly what the API offers. gateway/cli.py, the composition root, adds its commands.
"""
