"""The task queue, with no gRPC in it.

- base.py: the `TaskQueue` interface, what a task is and how it can end.
- memory.py: `MemoryQueue`, the default (nothing outlives the process).
- sqlite.py: `SqliteQueue`, the same kept in an SQLite file (`--journal`).
- dispatcher.py: this server's clients, and which of them gets which task.
"""
