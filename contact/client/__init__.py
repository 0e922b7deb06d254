"""The client's machinery under contact_client.py: its work across
reconnections (work.py), the handler pool that runs your task handler
(handler.py), and the helpers of its long-lived streams and retries
(streams.py)."""
