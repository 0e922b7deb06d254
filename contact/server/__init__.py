"""The server's machinery under contact_server.py: the server you use from
code (core.py), the handles that `submit` gives back (handles.py), the
checks on each call and which registration it belongs to (checks.py), the
standard health service (health.py), and tasks typed on standard input
(typed.py)."""
