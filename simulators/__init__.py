"""Simulated garments: the built-in load publisher now; socks, boots and clinical scenarios next."""
