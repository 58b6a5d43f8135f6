"""The asyncio/gRPC shell: downstream ADS server, upstream clients and process wiring."""
