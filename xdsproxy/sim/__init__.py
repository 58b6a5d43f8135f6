"""A simulated Istiod: Istio-shaped xDS for N services, with Istiod's nonce and version behaviour.

It is a stand-in for the real Istiod, which cannot run on these machines. It emits only standard
Envoy types so that a stock Envoy accepts everything it sends.
"""
