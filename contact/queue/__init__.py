"""The queue, with no gRPC in it: which connected client gets which task
(router.py), and where a server keeps its tasks until each has its outcome
(store.py: the interface and the in-memory default; journal.py: an SQLite
file that survives crashes)."""
