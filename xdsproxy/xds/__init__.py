"""Per-stream xDS protocol state for SotW and Delta, free of I/O (in the manner of h2).

A stream object is fed the bytes that arrive from Envoy (downstream) and from Istiod (upstream)
and returns the events the transport must carry out. It never touches a socket or an event loop.
"""
