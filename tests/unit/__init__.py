"""Pure: no sockets, no processes. The xDS state machines fed bytes, scoping on the real
dumps, stores on a temporary SQLite file, a fake clock."""
