"""Serving the `vms` relation.

keys (owners and VM names), serve (one unit's round), fleet (peer reports and the leader's
choice of unit).
"""
