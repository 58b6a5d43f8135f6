"""Facts about Istio's conventions (node ids, metadata, resource names), shared by all layers."""
