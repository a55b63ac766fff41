"""Garments and their protocol: wire models, identifiers and topics.

The device registry (patients, prescriptions, credentials) and the reference
device client also live here as they are built.
"""
