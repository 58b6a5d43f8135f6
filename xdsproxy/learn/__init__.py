"""Learning dependencies from the lazy egress's access logs."""
