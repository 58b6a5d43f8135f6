"""Wire level: type URLs, resource names and exact resource bytes, without decoding resources."""
