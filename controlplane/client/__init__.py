"""Clients of the control plane's APIs, for the programs that use them."""
